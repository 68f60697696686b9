"""Typed exceptions: every library error names the problem and the offending value."""


class AttributeRayError(Exception):
    """Base class for all attribute-ray errors."""


class TranscoderFormatError(AttributeRayError, ValueError):
    """A transcoder checkpoint is malformed: missing/unexpected tensors, bad shapes or config."""


class ShapeMismatchError(AttributeRayError, ValueError):
    """Two objects disagree on a dimension (e.g. transcoder d_model vs model d_model)."""


class UnsupportedModelError(AttributeRayError, ValueError):
    """The model family (config.model_type) has no adapter."""


class UnknownActivationError(TranscoderFormatError):
    """The transcoder config names an activation function attribute-ray does not implement."""


class HubUnavailableError(AttributeRayError, OSError):
    """A hub reference could not be fetched (no network, no cached copy)."""


class InterventionError(AttributeRayError, ValueError):
    """An intervention names a layer, feature, position or op the model/target does not have."""


class NoTranscoderError(AttributeRayError, ValueError):
    """A run that needs transcoders was asked of a `ReplacementModel` built without one (capture only)."""
