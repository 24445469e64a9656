"""The synthetic generator's knobs and split sizes (conf/data/synthetic.yaml, key `generator`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hcm.data.synthetic.render import FAMILIES
from hcm.data.synthetic.text import TEXT_STYLES

GENERATOR_VERSION = "1"
# (the paper has no `val` split: its sizes leave it empty)
PAPER_SIZES = {"train": 1044, "val": 0, "test": 468, "pseudo_label": 10724, "exploration": 115809}
DEFAULT_SIZES = {"train": 64, "val": 0, "test": 32, "pseudo_label": 64, "exploration": 0}
DEFAULT_FAMILY_WEIGHTS = {
    "colour": 1.0,
    "shape": 1.0,
    "label": 1.0,
    "parts_missing": 0.5,
    "quantity": 1.0,
    "shadow_missing": 1.0,
    "shadow_toward_light": 1.0,
    "shadow_inconsistent": 0.5,
    "floating": 1.0,
    "tilted": 0.5,
    "cropped": 0.5,
    "extra_object": 1.0,
    "extra_mark": 0.5,
}


@dataclass
class SyntheticConfig:
    """The generator's knobs (conf/data/synthetic.yaml, key `generator`).

    Mean answer length: with K ~ Binomial(4, p_clean) clean candidates the answer has K letters,
    or 1 ("N") when K = 0, so E|answer| = 4p + (1-p)^4; p = 0.395 gives 1.580 + 0.134 = 1.714,
    the paper's test split (1.7136; random-guess baseline 1.714 / 5 = 34.3%).
    """

    image_size: int = 112
    defect_strength: float = 0.7  # 0 = subtle defects, 1 = glaring ones
    p_clean: float = 0.395  # chance a candidate has no defect
    p_second_defect: float = 0.15  # chance a defective candidate gets one from a second dimension
    p_two_units: float = 0.25  # chance the original shows two units of the product
    family_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FAMILY_WEIGHTS))
    weak_cot_accuracy: float = 0.38  # fraction of weak CoTs whose answer is the label (paper 38%)
    weak_misname_prob: float = 0.3  # chance a weak CoT names a defect by the wrong family
    # chance the answer-driven CoT states an unacceptable candidate's defects wrongly (its
    # verdicts and answer stay right: scene._sample_annotator); 0 = every observation true
    answer_cot_error_rate: float = 0.0
    text_style: str = "full"  # captions and CoTs: "full" sentences or "compact" (a few words each)

    def __post_init__(self) -> None:
        self.family_weights = {str(k): float(v) for k, v in dict(self.family_weights).items()}
        unknown = sorted(set(self.family_weights) - set(FAMILIES))
        if unknown:
            raise ValueError(f"unknown defect families {unknown}; expected {list(FAMILIES)}")
        if any(w < 0 for w in self.family_weights.values()):
            raise ValueError(f"family weights must be >= 0, got {self.family_weights}")
        # shadow_inconsistent needs two units, so some other family must be drawable
        if not any(w > 0 for f, w in self.family_weights.items() if f != "shadow_inconsistent"):
            raise ValueError("some defect family other than shadow_inconsistent needs weight > 0")
        probabilities = ("p_clean", "p_second_defect", "p_two_units", "weak_cot_accuracy")
        probabilities += ("answer_cot_error_rate",)
        for name in ("defect_strength", *probabilities, "weak_misname_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.text_style not in TEXT_STYLES:
            raise ValueError(
                f"text_style must be one of {sorted(TEXT_STYLES)}, got {self.text_style!r}"
            )
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
