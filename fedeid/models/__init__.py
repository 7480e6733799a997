"""Networks of fedeid: frozen semantic encoder, MDL decoupler, compensation decoder, ReID, classifier."""

from fedeid.models.backbone import ConvNet
from fedeid.models.deid_model import DeIdModel, build_deid_model, cfg_findings, load_shared_state, shared_state
from fedeid.models.reid import ReIDNet

__all__ = ["ConvNet", "DeIdModel", "ReIDNet", "build_deid_model", "cfg_findings", "load_shared_state",
           "shared_state"]
