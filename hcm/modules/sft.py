"""Stage 1: cold-start SFT (eq. 1), the loss on the assistant reply's tokens only.

The collator masks prompt, image and padding positions with -100, so the cross entropy that
transformers computes from `labels` is eq. 1 averaged over the batch's assistant tokens.
Table 2: ViT and aligner frozen (conf/module/sft.yaml).
"""

from __future__ import annotations

from hcm.faults import fault_point
from hcm.modules.base import ScreeningModule


class SFTModule(ScreeningModule):
    def training_step(self, batch: dict, batch_idx: int):
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(self.model.dtype),
            labels=batch["labels"],
        )
        fault_point("sft_step")
        n_tokens = (batch["labels"] != -100).sum()
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch["ids"]))
        self.log("train/target_tokens", n_tokens.float(), batch_size=len(batch["ids"]))
        return out.loss
