"""attribute-ray: exact attribution graphs for transcoders and cross-layer transcoders.

The core library imports and runs without Ray; Ray lives only in `deployments/` and `jobs/`.
"""

from attribute_ray.errors import (
    AttributeRayError,
    HubUnavailableError,
    InterventionError,
    ShapeMismatchError,
    TranscoderFormatError,
    UnknownActivationError,
    UnsupportedModelError,
)
from attribute_ray.attribution import AttributionSettings, CustomTarget, attribute
from attribute_ray.graph import Graph, LogitTarget, graph_scores, prune_graph
from attribute_ray.interventions import Intervention, Supernode, check_graph, generate_with_interventions, intervene
from attribute_ray.replacement import ActiveFeatures, Additions, ReplacementModel, Trace, load_model
from attribute_ray.transcoders import Activation, Hookpoints, Transcoder, load_transcoder, save_circuit_tracer, save_sparsify

__version__ = "0.1.0"

__all__ = [
    "AttributionSettings", "CustomTarget", "Graph", "LogitTarget", "attribute", "graph_scores", "prune_graph",
    "Intervention", "InterventionError", "Supernode", "check_graph", "generate_with_interventions", "intervene",
    "Activation", "ActiveFeatures", "Additions", "AttributeRayError", "Hookpoints", "HubUnavailableError",
    "ReplacementModel", "ShapeMismatchError", "Trace", "Transcoder", "TranscoderFormatError",
    "UnknownActivationError", "UnsupportedModelError", "load_model", "load_transcoder", "save_circuit_tracer",
    "save_sparsify",
]
