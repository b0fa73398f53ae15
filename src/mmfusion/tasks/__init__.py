"""Ready-made uses of the interfaces: zero-shot labels, concept flags, choosing among captions."""

from ..data.prompts import read_templates
from .labels import Prediction, ZeroShotClassifier, best_caption, moderate, read_labels

__all__ = ["Prediction", "ZeroShotClassifier", "best_caption", "moderate", "read_labels", "read_templates"]
