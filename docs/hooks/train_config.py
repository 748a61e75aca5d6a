"""MkDocs hook: the oclear-train configuration reference, generated from the TrainConfig dataclass.

The page is rendered at every build from oclear_ext/train/config.py itself (static reading, no import: the
site builds without the compiled extension), so it cannot drift from the code: each field's TOML key, flag,
type, default and the comment written beside it, grouped by the section comments of the dataclass.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

from mkdocs.structure.files import File, Files

CONFIG_SOURCE = Path(__file__).resolve().parents[2] / "oclear_ext" / "train" / "config.py"
PAGE = "training_config.md"

# Fields that carry no comment in the source yet. python_tests/test_docs.py checks that every key here is a
# field and that none of them has meanwhile gained a comment (the source then wins: delete the entry), so
# this table cannot outlive the code. Best: write the comment beside the field and drop the entry.
SUPPLEMENT = {
    "out_dir": "run folder: config.json, classes.json, metrics.jsonl, summary.json, checkpoints/",
    "dim": "embedding dimension of queries, docs and class centres",
    "image_encoder": "small-cnn (trained from scratch) | efficientnet-lite0 (pretrained, frozen; extra [pretrained])",
    "text_encoder": "hashing (CRC-32 word buckets, trained) | minilm (pretrained, frozen; extra [pretrained])",
    "fusion": "concept-aware fusion of a doc's image and text (off: docs are image-only)",
    "num_concepts": "concepts in the fusion's learnable concept memory",
    "num_heads": "attention heads of the fusion (dim must be divisible by it)",
    "image_size": "images are resized to image_size x image_size",
    "scale": "margin softmax scale s (> 0)",
    "margin": "(m1, m2, m3): target logit s (cos(m1 theta + m2) - m3); ArcFace (1, 0.5, 0), CosFace (1, 0, 0.35)",
    "epochs": "passes over the training manifest",
    "lr": "learning rate of the model (and of the classifier unless classifier_lr)",
    "weight_decay": "decoupled (adamw) or L2 (sgd) weight decay",
    "schedule": "cosine | constant, after the linear warm-up",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "seed": "seeds the model, the sampler and the negatives",
    "num_workers": "DataLoader worker processes",
    "log_every": "steps between metrics.jsonl records",
    "progress": "progress bar (tqdm, extra [train])",
}


@dataclass
class ConfigField:
    name: str
    type: str
    default: str      # Python source of the default
    section: str
    description: str


def read_fields(source_path: Path = CONFIG_SOURCE, class_name: str = "TrainConfig") -> list[ConfigField]:
    """Fields of the dataclass in source order, with their section (a comment line of its own above them)
    and their description (the comment beside the field, continued by comment-only lines below it)."""
    source = source_path.read_text()
    cls = next((n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if cls is None:
        raise ValueError(f"train_config hook: no class {class_name} in {source_path}")
    comments: dict[int, tuple[str, bool]] = {}  # line -> (comment text, the line holds nothing else)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            own_line = not tok.line[: tok.start[1]].strip()
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), own_line)
    fields: list[ConfigField] = []
    section, last_line = "", cls.lineno
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        for line in range(last_line + 1, node.lineno):  # comment-only lines between fields
            text, own_line = comments.get(line, ("", False))
            if own_line and text:
                if fields and line == last_line + 1 and _is_continuation(source, line):
                    fields[-1].description += " " + text
                else:
                    section = text
        if node.value is None:
            raise ValueError(f"train_config hook: {class_name}.{node.target.id} has no default")
        text, own_line = comments.get(node.lineno, ("", True))
        fields.append(ConfigField(node.target.id, ast.unparse(node.annotation), ast.unparse(node.value),
                                  section, "" if own_line else text))
        last_line = node.end_lineno
        # a description may continue on the comment-only lines right below the field
        while comments.get(last_line + 1, ("", False))[1] and _is_continuation(source, last_line + 1):
            fields[-1].description += " " + comments[last_line + 1][0]
            last_line += 1
    return fields


def _is_continuation(source: str, line: int) -> bool:
    """A comment-only line indented past the fields' own indentation continues the comment above it."""
    text = source.splitlines()[line - 1]
    return len(text) - len(text.lstrip()) > 4


def render(fields: list[ConfigField]) -> str:
    lines = [
        "# oclear-train configuration",
        "",
        "Every field of `oclear_ext.train.TrainConfig`, generated from its source at each documentation build.",
        "A field is a key of the TOML file (`oclear-train --config run.toml`) and a flag (`--field-name`; booleans",
        "as `--name` / `--no-name`; `none` unsets an optional value); flags override the file. The run folder",
        "keeps the full configuration as `config.json`, which `--config` also reads.",
        "",
        "```toml",
        "# run.toml: any subset of the fields",
        'train_manifest = "builtin:emoji"',
        "epochs = 8",
        "margin = [1.0, 0.5, 0.0]",
        'negatives = "topk:256"',
        "```",
    ]
    current = None
    for f in fields:
        if f.section != current:
            current = f.section
            lines += ["", f"## {current.capitalize() if current else 'Data and output'}", "",
                      "| key | flag | type | default | meaning |", "|---|---|---|---|---|"]
        flag = "--" + f.name.replace("_", "-")
        description = (f.description or SUPPLEMENT.get(f.name, "")).replace("|", "\\|")
        cells = [f"`{f.name}`", f"`{flag}`", f"`{f.type}`".replace("|", "\\|"), f"`{f.default}`", description]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, PAGE, content=render(read_fields())))
    return files
