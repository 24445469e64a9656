"""The procedural synthetic screening benchmark, the project's default dataset.

No real screening data can be downloaded, so this package draws samples of the paper's shape
(Table 1): an original product image and four candidates A-D, each clean or carrying controlled
defects from the four dimensions of section 3.1 (families in `render.FAMILIES`). Labels
and texts are read off the generator's metadata, so they are true to the pixels.

Every sample is a pure function of (seed, split, index): files written by `write_dataset` and
samples drawn by `SyntheticStream` agree, and neither order nor worker count matters.

Departures from the paper, and why:
- The CoT's final choice is the whole label ("AC"), not one letter: a label lists every
  acceptable candidate and the CoT is conditioned on it (the paper's answer-driven CoT).
- Weak CoTs (the paper's Qwen-VL-Max pseudo-labels, about 38% accurate) are made like the true
  CoT from corrupted metadata; their accuracy is a parameter.
- `defect_strength` (0..1) scales how visible defects are, so difficulty can be set to leave
  reinforcement learning headroom above SFT (a small model saturates the easy setting).

The package, in the order a sample is made:
- `config`: the generator's knobs (`SyntheticConfig`) and the split sizes;
- `scene`: a sample's random choices (product, scenes, defects, a weak annotator's claims) as
  JSON-serialisable metadata, a pure function of (seed, split, index);
- `render`: the images drawn from that metadata; `text`: its caption and CoTs;
- `sample`: labels, texts and images read off the metadata, and what each split keeps;
- `dataset`: the files on disk (`write_dataset`, `dataset_complete`, the folder's name
  `dataset_digest`) and the command line
  (`python -m hcm.data.synthetic --help`); `stream`: fresh samples every step.
"""

from hcm.data.synthetic.config import SyntheticConfig
from hcm.data.synthetic.dataset import (
    dataset_args,
    dataset_complete,
    dataset_digest,
    write_dataset,
)
from hcm.data.synthetic.sample import generate_sample
from hcm.data.synthetic.stream import SyntheticStream

__all__ = [
    "SyntheticConfig",
    "SyntheticStream",
    "dataset_args",
    "dataset_complete",
    "dataset_digest",
    "generate_sample",
    "write_dataset",
]
