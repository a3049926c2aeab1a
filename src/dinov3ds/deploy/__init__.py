"""Deployment: a trained model as one self-describing ONNX file (any size, fp32 or fp16) and the runner that
serves it with onnxruntime; TorchScript for PyTorch-only stacks.

`onnx_export` traces and checks the graph (`traceable` keeps its sizes dynamic, `half` converts it to fp16,
`metadata` writes and reads its `dinov3ds.` facts), `runtime` runs it with numpy only, `serving` puts it
behind the interface `predict` uses for a checkpoint, `torchscript` traces one fixed size.
"""
