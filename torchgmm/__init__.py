"""torchgmm: batched Gaussian mixture models in PyTorch.

One ``fit`` call fits thousands of independent mixtures (each with restarts) as one tensor EM on
CPU or CUDA. See ``GaussianMixture`` (the nn.Module with scikit-learn's names) and ``fit`` (the
functional entry point returning a ``FitResult``).
"""
from .compare import Comparison, compare
from .covariance import COVARIANCE_TYPES, Covariance, get_covariance
from .density import GMMParams, component_log_prob, log_prob, log_responsibilities, responsibilities
from .fitting import fit
from .methods import EM, SQUAREM, Gradient
from .mixture import GaussianMixture
from .hmm import GaussianHMM
from .result import ConvergenceWarning, DegenerateWarning, FitResult, FitStatus, FitWarning
from .serialization import load
from .validation import NotFittedError

__version__ = "0.1.0"

__all__ = [
    "GaussianMixture", "GaussianHMM", "fit", "load", "EM", "SQUAREM", "Gradient", "compare", "Comparison", "FitResult", "FitStatus", "GMMParams", "NotFittedError",
    "FitWarning", "ConvergenceWarning", "DegenerateWarning",
    "component_log_prob", "log_prob", "log_responsibilities", "responsibilities",
    "COVARIANCE_TYPES", "Covariance", "get_covariance",
]
