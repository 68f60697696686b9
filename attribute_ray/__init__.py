"""attribute-ray: exact attribution graphs for transcoders and cross-layer transcoders.

The core library imports and runs without Ray; Ray lives only in `deployments/` and `jobs/`.
"""

from attribute_ray.attribution import CustomTarget, attribute
from attribute_ray.errors import (
    AttributeRayError,
    HubUnavailableError,
    InterventionError,
    NoTranscoderError,
    ShapeMismatchError,
    TranscoderFormatError,
    UnknownActivationError,
    UnsupportedModelError,
)
from attribute_ray.graph import Graph, LogitTarget, graph_scores, prune_graph
from attribute_ray.interventions import Intervention, Supernode, check_graph, generate_with_interventions, intervene
from attribute_ray.loading import load_model
from attribute_ray.replacement import (
    ActiveFeatures,
    Additions,
    Capture,
    Edit,
    Frozen,
    Record,
    Replaced,
    ReplacementModel,
    RunOutput,
    Trace,
)
from attribute_ray.settings import AttributionSettings, GraphSettings, PruneSettings
from attribute_ray.transcoders import Activation, Hookpoints, Transcoder, load_transcoder, save_circuit_tracer, save_sparsify

__version__ = "0.1.0"

__all__ = [
    "AttributionSettings", "GraphSettings", "PruneSettings", "CustomTarget", "Graph", "LogitTarget", "attribute",
    "graph_scores", "prune_graph",
    "Intervention", "InterventionError", "Supernode", "check_graph", "generate_with_interventions", "intervene",
    "Activation", "ActiveFeatures", "Additions", "AttributeRayError", "Hookpoints", "HubUnavailableError",
    "Capture", "Edit", "Frozen", "NoTranscoderError", "Record", "Replaced", "ReplacementModel", "RunOutput",
    "ShapeMismatchError", "Trace", "Transcoder", "TranscoderFormatError",
    "UnknownActivationError", "UnsupportedModelError", "load_model", "load_transcoder", "save_circuit_tracer",
    "save_sparsify",
]
