"""The one error type of :mod:`normkit.onnx`: a usage problem with a one-line message (the CLI prints it
and exits 2)."""


class OnnxError(ValueError):
    """A model, file or option that normkit's ONNX tools cannot handle; the message says what and why."""
