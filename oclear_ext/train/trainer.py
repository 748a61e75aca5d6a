"""The training loop: DDP encoders + class-sharded margin softmax, under torchrun or in one process.

Per step: the rank's batch (queries and docs mixed) -> OclearModel (DDP, gradients SUMMED over ranks because
the classifier returns the global batch's loss) -> ShardedMarginClassifier (class weights split over ranks,
optional negative sampling with row-sparse optimizer steps) [+ contrastive_weight * the label-aware
contrastive loss (CLCE) of the embeddings over the gathered global batch] -> backward -> clip the model's
gradient norm -> both optimizers step -> both LR schedules step. Rank 0 shows a progress bar (loss, samples/s,
ETA), writes metrics.jsonl and evaluates retrieval on the validation manifest every eval_every steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import RandomNegatives, TopKNegatives
from .._ops.options import margin_softmax_options
from ..data.dataset import ManifestDataset, collate
from ..data.image_check import check_manifest_images
from ..data.manifest import load_manifest
from ..distributed import ddp_sum_gradients
from ..distributed.sharded_softmax import world_and_rank
from ..losses import gathered_label_aware_contrastive_loss
from ..models import ModelConfig, OclearModel
from ..nn import ShardedMarginClassifier
from ..nn.query_composer import weight_loss, weight_targets
from ..optim import RowSparseAdamW, RowSparseSGD
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import resolve_manifest
from .evaluation import evaluate_model
from .sampler import RankBatchSampler


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(world, rank): joins torchrun's process group when launched by it (gloo on CPU, NCCL on CUDA)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world_and_rank()


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("config: device = cuda but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def lr_lambda(config: TrainConfig, total_steps: int):
    """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at total_steps."""
    def factor(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def build_negatives(config: TrainConfig, seed: int):
    kind, value = config.negatives_spec()
    if kind == "topk":
        return TopKNegatives(int(value)), None
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        return RandomNegatives(rate=value, generator=generator), generator
    return None, None


def build_optimizers(config: TrainConfig, model, classifier, sampled: bool):
    cls_lr = config.classifier_lr or config.lr
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        cls_type = RowSparseSGD if sampled else torch.optim.SGD
        cls_opt = cls_type([classifier.trainable_weight], lr=cls_lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        cls_type = RowSparseAdamW if sampled else torch.optim.AdamW
        cls_opt = cls_type([classifier.trainable_weight], lr=cls_lr, weight_decay=config.weight_decay)
    return opt, cls_opt


def text_keep_mask(n: int, rate: float, seed: int, step: int, rank: int) -> torch.Tensor:
    """(n,) bool: False with probability `rate` (text dropout), drawn from (seed, step, rank): reproducible on resume.

    Without dropout, fusion learns to identify training classes by their text and the doc embedding drifts away
    from the image-only query embedding; held-out classes then retrieve worse than with image-only docs.
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)
    return torch.rand(n, generator=gen) >= rate


@dataclasses.dataclass(frozen=True)
class CompositionLoss:
    """The self-supervised loss on composed queries' adaptive weights (nn.query_composer.weight_targets)."""

    weight: float
    temperature: float


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
    """The CLCE term: weight * losses.label_aware_contrastive_loss over the (global) batch's embeddings."""

    weight: float
    temperature: float
    hard_negative_beta: float = 0.0


def batch_loss(model, classifier, images: torch.Tensor, texts: list, is_query: torch.Tensor, labels: torch.Tensor,
               text_keep: torch.Tensor, text_loss_weight: float = 0.0, autocast=None,
               modifiers: list | None = None, composition: CompositionLoss | None = None,
               contrastive: ContrastiveLoss | None = None) -> tuple[torch.Tensor, Callable[[], None]]:
    """(loss, backward): classifier(embeddings of the mixed batch) + text_loss_weight * classifier(text embeddings).

    The text loss makes what each doc's text adds to it (normalize(W c), every doc with text, dropped or not)
    classify on its own, with the class weights held fixed for it (no gradient reaches them from these rows):
    the text path learns to point where the images put each class, which carries over to classes never
    trained on, instead of the classes moving towards their titles. Without it the text only has to fix what
    the training images get wrong, close to nothing once they are fitted, and learns little that generalises.
    (Applied to the text read c before W instead, it left W c untrained towards the class: fusion tied
    image-only docs on validation.)

    backward() runs the classifier's backward (its collectives, the same on every rank) to completion
    before the model's, whose DDP gradient all-reduces would otherwise interleave with them in an order
    that depends on which rank's docs have text. `autocast` (a context manager) covers the model only.

    modifiers: the query rows' modifier texts (composed queries). With `composition`, the adaptive weights of
    the composed rows are pulled towards their self-supervised targets (composition_targets), a model-side
    loss added to the classifier's.

    contrastive: adds weight * the label-aware contrastive loss (CLCE) of the mixed batch's embeddings, over
    the global batch when distributed (see _classifier_loss).
    """
    with autocast or contextlib.nullcontext():
        out = model(images, texts, is_query, text_keep=text_keep, return_text=bool(text_loss_weight),
                    modifiers=modifiers, return_query_parts=True)
    *out, parts = out
    out = out[0] if len(out) == 1 else tuple(out)
    # Labels come from the training ClassIndex, valid by construction: no label range check (on CUDA it would
    # read a flag back to the host, a stream synchronisation, in every forward and backward).
    with margin_softmax_options(check_labels=False):
        extra = None
        if composition is not None and composition.weight:
            extra = composition_loss(classifier, parts, labels, images.shape[0], composition.temperature)
            extra = None if extra is None else composition.weight * extra
        return _classifier_loss(classifier, out, labels, images.shape[0], text_loss_weight, extra, contrastive)


def composition_loss(classifier, parts: dict | None, labels: torch.Tensor, n: int, temperature: float
                     ) -> torch.Tensor | None:
    """BCE of the composed rows' adaptive weights against sigmoid((loss(text part) - loss(image part)) / T).

    The per-row losses of each part alone come from the classifier itself (no gradient, the full softmax:
    negatives sampling is off for these calls and the step's sampled classes are kept). Every rank calls
    the classifier with all n rows, composed or not (non-composed rows are ignored), so the sharded head's
    collectives see the same shapes everywhere.
    """
    if parts is None:
        return None  # no composed row in this batch
    rows = parts["rows"]
    ignore = torch.full_like(labels, classifier.settings.ignore_index)
    part_labels = ignore.index_copy(0, rows, labels[rows])
    losses = []
    saved = classifier.reduction, classifier.negatives, classifier.active_classes
    classifier.reduction, classifier.negatives = "none", None
    try:
        with torch.no_grad():
            for name in ("image", "text"):
                x = torch.zeros(n, parts[name].shape[1], device=labels.device).index_copy(0, rows, parts[name].float())
                losses.append(classifier(x, part_labels)[rows])
    finally:
        classifier.reduction, classifier.negatives, classifier.active_classes = saved
    return weight_loss(parts["alpha"], weight_targets(*losses, temperature=temperature))


def _classifier_loss(classifier, out, labels: torch.Tensor, n: int, text_loss_weight: float,
                     model_loss: torch.Tensor | None = None, contrastive: ContrastiveLoss | None = None
                     ) -> tuple[torch.Tensor, Callable[[], None]]:
    rows = out if not text_loss_weight else torch.cat(out[:2])
    leaf = rows.detach().float().requires_grad_()  # the classifier's backward stops here
    loss = classifier(leaf[:n], labels)
    if contrastive is not None and contrastive.weight:
        # On the leaf, like the classifier: its gradient joins the classifier's in leaf.grad, and its
        # collectives (the gather's reduce-scatter) run inside the classifier's backward, in the same order
        # on every rank, before DDP's all-reduces start (as a model_loss they would run among them). Each
        # rank's graph holds its own anchors' terms only, so leaf.grad is d(global loss)/d(own rows), the
        # classifier's convention that DDP's summed gradients rely on.
        loss = loss + contrastive.weight * gathered_label_aware_contrastive_loss(
            leaf[:n], labels, temperature=contrastive.temperature, hard_negative_beta=contrastive.hard_negative_beta,
            ignore_index=classifier.settings.ignore_index)
    if text_loss_weight:
        ignore = torch.full_like(labels, classifier.settings.ignore_index)
        classifier.weight.requires_grad_(False)
        try:
            loss = loss + text_loss_weight * classifier(leaf[n:], torch.where(out[2], labels, ignore))
        finally:
            classifier.weight.requires_grad_(True)

    def backward() -> None:
        loss.backward()  # the backward op takes the forward's settings (check_labels too) from its context
        if model_loss is None:
            rows.backward(leaf.grad.to(rows.dtype))
        else:
            torch.autograd.backward([rows, model_loss], [leaf.grad.to(rows.dtype), None])

    return (loss if model_loss is None else loss + model_loss.detach()), backward


class MetricsLog:
    """metrics.jsonl in the run folder (rank 0 only): one JSON object per line."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(config: TrainConfig) -> dict:
    """Runs training as configured. Returns the summary written to summary.json (final step, samples/s,
    world size, last evaluation, run folder) plus "losses" (every step's loss on this rank) and "model"
    (the trained OclearModel, unwrapped from DDP)."""
    device = pick_device(config.device)
    world, rank = init_distributed(device)
    out = Path(config.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.json")
    torch.manual_seed(config.seed)  # the same model init on every rank (DDP also broadcasts it)

    train_manifest = resolve_manifest(config.train_manifest, "train", out / "data", rank)
    # Every image decoded before the first step, so that a corrupt file stops the run here, not mid-epoch
    # (rank 0 keeps a cache of the files found good, for resumes and later runs).
    train_manifest = check_manifest_images(load_manifest(train_manifest), config.skip_bad_images,
                                           out / "image_check.json" if rank == 0 else None)
    composed = sum(it.modifier is not None for it in train_manifest.items)
    if composed and not config.composed_queries:
        raise ValueError(f"config: the training manifest has {composed} composed queries (rows with a 'modifier') "
                         "but composed_queries = false; set composed_queries = true (--composed-queries)")
    dataset = ManifestDataset(train_manifest, image_size=config.image_size, seed=config.seed)
    if rank == 0:
        dataset.class_index.save(out / "classes.json")
    weights = torch.tensor([it.weight for it in (dataset.manifest.items[p] for p in dataset.positions)]) \
        if config.weighted_sampling else None
    sampler = RankBatchSampler(len(dataset), config.batch_size, rank, world, config.seed, weights)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.num_workers)
    steps_per_epoch = len(sampler)
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    model = OclearModel(ModelConfig(config.dim, config.image_encoder, config.text_encoder, config.fusion,
                                    config.num_concepts, config.num_heads, config.image_size,
                                    config.composed_queries, config.query_composition)).to(device)
    negatives, neg_generator = build_negatives(config, config.seed * 7919 + rank)
    torch.manual_seed(config.seed * 7919 + rank)  # each rank draws its own classifier shard
    classifier = ShardedMarginClassifier(len(dataset.class_index), config.dim, scale=config.scale,
                                         margin=config.margin, negatives=negatives,
                                         sparse_grad=negatives is not None, device=device)
    opt, cls_opt = build_optimizers(config, model, classifier, negatives is not None)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(config, total_steps)) for o in (opt, cls_opt)]
    generators = {"negatives": neg_generator} if neg_generator is not None else {}
    step, epoch, batch_in_epoch = 0, 0, 0
    if config.resume:
        position = load_checkpoint(config.resume, model=model, classifier=classifier, optimizer=opt,
                                   classifier_optimizer=cls_opt, schedulers=schedulers, generators=generators,
                                   device=device, same={"optimizer": config.optimizer, "dim": config.dim,
                                                        "fusion": config.fusion})
        step, epoch, batch_in_epoch = position["step"], position["epoch"], position["batch_in_epoch"]
    ddp = model
    if world > 1:
        ddp = ddp_sum_gradients(DistributedDataParallel(model, find_unused_parameters=True))

    log = MetricsLog(out / "metrics.jsonl", rank == 0)
    bar = _progress(config, rank, total_steps, step)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    losses: list[float] = []
    text_loss_weight = config.text_loss_weight if config.fusion else 0.0
    composition = (CompositionLoss(config.composition_weight_loss, config.composition_temperature)
                   if config.composed_queries and config.query_composition == "adaptive" else None)
    contrastive = (ContrastiveLoss(config.contrastive_weight, config.contrastive_temperature,
                                   config.contrastive_hard_negative_beta) if config.contrastive_weight else None)
    samples, t_start = 0, time.perf_counter()
    evaluation = None
    model.train()
    while step < total_steps:
        sampler.set_epoch(epoch, batch_in_epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            is_query = torch.tensor([r == "query" for r in batch["role"]], device=device)
            keep = text_keep_mask(len(labels), config.text_dropout, config.seed, step, rank).to(device)
            opt.zero_grad(set_to_none=True)
            cls_opt.zero_grad(set_to_none=True)
            loss, backward = batch_loss(ddp, classifier, images, batch["text"], is_query, labels, keep,
                                        text_loss_weight, autocast, modifiers=batch.get("modifier"),
                                        composition=composition, contrastive=contrastive)
            backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            cls_opt.step()
            for s in schedulers:
                s.step()
            step += 1
            batch_in_epoch += 1
            samples += images.shape[0] * world
            losses.append(loss.item())
            elapsed = time.perf_counter() - t_start
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", samples_s=f"{samples / elapsed:.0f}", epoch=epoch)
            if step % config.log_every == 0 or step == total_steps:
                log.write({"step": step, "epoch": epoch, "loss": losses[-1], "lr": schedulers[0].get_last_lr()[0],
                           "samples_per_s": samples / elapsed, "elapsed_s": elapsed})
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                evaluation = _evaluate(config, model, out, step, rank, log)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                _save(config, out, step, epoch, batch_in_epoch, model, classifier, opt, cls_opt, schedulers, generators)
            if step >= total_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    _save(config, out, step, epoch, batch_in_epoch, model, classifier, opt, cls_opt, schedulers, generators)
    if config.val_manifest:
        evaluation = _evaluate(config, model, out, step, rank, log)
    summary = {"step": step, "samples_per_s": samples / elapsed if elapsed > 0 else None, "world_size": world,
               "evaluation": evaluation, "out_dir": str(out)}
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "losses": losses, "model": model}


def _progress(config: TrainConfig, rank: int, total: int, initial: int):
    if rank != 0 or not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _save(config, out, step, epoch, batch_in_epoch, model, classifier, opt, cls_opt, schedulers, generators):
    save_checkpoint(out, step, model=model, classifier=classifier, optimizer=opt, classifier_optimizer=cls_opt,
                    schedulers=schedulers, config=config.__dict__.copy(), generators=generators,
                    position={"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch})


def _evaluate(config: TrainConfig, model, out: Path, step: int, rank: int, log: MetricsLog):
    result = None
    if rank == 0:
        manifest = resolve_manifest(config.val_manifest, "heldout", out / "data", rank)
        result = evaluate_model(model, manifest)
        log.write({"step": step, "eval": result})
    if dist.is_initialized():
        dist.barrier()
    return result
