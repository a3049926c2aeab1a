"""One module per `dinov3ds` subcommand that is more than a call: eval, predict, export, feature tools, check-data, demo."""
