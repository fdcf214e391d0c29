"""Image-text alignment losses: CLIP's softmax InfoNCE and SigLIP's pairwise sigmoid loss.

Each loss is a pure function of the two embedding batches and the temperature (and bias),
plus a thin module that holds those learnable scalars. Row i of the image batch and row i
of the text batch are a matching pair; every other row is a negative. The text batch may
hold N more rows than the image batch: extra negatives for the images (hard negatives, as
NegCLIP adds captions with swapped words), which take part on the image->text side only.

Under torchrun each process holds a share of the batch. With `gather=True` the criteria first
all-gather every process's embeddings, with gradients (`gather_batch`), so that the loss is the
one of the whole batch, as open_clip's `gather_with_grad` does; see `gather_batch` for why the
gradients then equal one process's on the whole batch.

Shapes: B batch, N extra negative texts, E embedding width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float, *,
              rows: slice | None = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021).

    image_embeds (B, E), text_embeds (B + N, E) are L2-normalised here (a no-op if they
    already are); logits = exp(logit_scale) * img @ txt.T (B, B + N); the loss is the mean
    of the image->text cross-entropy (over all B + N texts) and the text->image one (the B
    paired texts over the B images), with the diagonal as targets.

    rows: score only these images (against all B + N texts) and these paired texts (against all
    B images), and return their share of the loss (their terms over 2B): the shares of disjoint
    rows add up to the loss. A process's own rows of a gathered batch (open_clip's local_loss).
    """
    image = F.normalize(image_embeds, dim=-1)
    text = F.normalize(text_embeds, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=image.dtype, device=image.device).exp()
    B = image.shape[0]
    if rows is None:
        logits = scale * image @ text.T  # (B, B+N)
        targets = torch.arange(B, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, :B].T, targets)) / 2
    targets = torch.arange(rows.start, rows.stop, device=image.device)
    image_to_text = F.cross_entropy(scale * image[rows] @ text.T, targets, reduction="sum")  # (b, B+N) logits
    text_to_image = F.cross_entropy(scale * text[rows] @ image.T, targets, reduction="sum")  # (b, B) logits
    return (image_to_text + text_to_image) / (2 * B)


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                logit_bias: torch.Tensor | float, *, rows: slice | None = None) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023), normalised as in big_vision.

    logits = exp(logit_scale) * img @ txt.T + logit_bias (B, B) on L2-normalised
    embeddings; labels are +1 on the diagonal and -1 elsewhere. The loss is
    -mean_i sum_j log sigmoid(label_ij * logit_ij): summed over the B texts of each image,
    averaged over the B images (big_vision's `trainers/proj/image_text/siglip.py`, i.e. the
    paper's -1/|B| sum_i sum_j). It is therefore not a mean over the B*B pairs, and grows
    with the batch size.

    rows: score only these images (against all B + N texts) and return their share of the loss
    (their terms over B): the shares of disjoint rows add up to the loss.
    """
    image = F.normalize(image_embeds, dim=-1)
    text = F.normalize(text_embeds, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=image.dtype, device=image.device).exp()
    B = image.shape[0]
    rows = slice(0, B) if rows is None else rows
    logits = scale * image[rows] @ text.T + logit_bias  # (b, B+N)
    labels = -torch.ones_like(logits)
    labels[torch.arange(logits.shape[0]), torch.arange(rows.start, rows.stop)] = 1  # +1 on the pairs, -1 elsewhere
    return -F.logsigmoid(labels * logits).sum() / B


def world_size() -> int:
    """How many processes train together (torch.distributed's group; 1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """All-gather of (n_p, ...) row blocks whose n_p may differ between processes, concatenated in rank
    order, with gradients: the backward sums the gathered tensor's gradient over the processes
    (all_reduce) and hands each process its own rows', so that the gradient of a row comes from every
    process's loss. (torch.distributed.nn.functional.all_gather does the same with a reduce-scatter, or an
    all-to-all on gloo, but needs equal shapes; the extra negatives differ in number.)"""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.start, ctx.count = sum(counts[:rank]), counts[rank]
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))  # all_gather needs one shape on every process
        padded[:tensor.shape[0]] = tensor
        blocks = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(blocks, padded)
        return torch.cat([block[:n] for block, n in zip(blocks, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # SUM: every process's loss depends on every row
        return grad[ctx.start:ctx.start + ctx.count], None


@dataclass
class GatheredBatch:
    images: torch.Tensor  # (B, E) every process's images, in rank order
    texts: torch.Tensor  # (B + N, E) every process's paired texts in rank order, then every process's negatives
    rows: slice  # this process's rows of `images` (and of the paired texts)


def gather_batch(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> GatheredBatch:
    """Every process's (b_p, E) images and (b_p + n_p, E) texts (its pairs, then its extra negatives),
    gathered with gradients. Every process must call it (it is a collective), in the same order.

    Why the gradients are exact under DDP (which averages the processes' parameter gradients): the
    gradient of a process's own rows is the sum over processes of their losses' gradients. If every
    process computes the whole batch's loss L, a row's gradient is W·dL/d(row) (W processes), each process's
    parameter gradient is W·(L's gradient through its own rows), and DDP's mean of those is dL/dθ; the
    temperature, outside the gather, gets dL/ds on every process, and the mean keeps it. If each process
    computes only its rows' share L_p (sum over p = L) times W, the sum of the shares' gradients again
    gives dL/d(row) times W, and the same mean gives dL/dθ and dL/ds."""
    b, n = image_embeds.shape[0], text_embeds.shape[0] - image_embeds.shape[0]
    sizes = [torch.zeros(2, dtype=torch.long) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([b, n]))
    pairs, negatives = tuple(int(s[0]) for s in sizes), tuple(int(s[1]) for s in sizes)
    images = _GatherRows.apply(image_embeds.contiguous(), pairs)
    texts = _GatherRows.apply(text_embeds[:b].contiguous(), pairs)
    if sum(negatives):  # a process without negatives still takes part, with its (0, E) slice
        texts = torch.cat([texts, _GatherRows.apply(text_embeds[b:].contiguous(), negatives)])
    start = sum(pairs[:dist.get_rank()])
    return GatheredBatch(images, texts, slice(start, start + b))


def _gathered(loss, image_embeds: torch.Tensor, text_embeds: torch.Tensor, local_loss: bool) -> torch.Tensor:
    """`loss(images, texts, rows=)` over the gathered batch: the whole batch's loss, or with local_loss this
    process's rows' share times the number of processes (the mean over processes is the whole batch's loss)."""
    batch = gather_batch(image_embeds, text_embeds)
    if local_loss:
        return world_size() * loss(batch.images, batch.texts, rows=batch.rows)
    return loss(batch.images, batch.texts)


class ContrastiveLoss(nn.Module):
    """Holds CLIP's learnable temperature: logit_scale = log(1 / 0.07) at init, used clamped to <= log(100)."""

    def __init__(self, init_scale: float = math.log(1 / 0.07), max_scale: float = math.log(100.0)):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.max_scale = max_scale  # CLIP caps the logit multiplier exp(logit_scale) at 100

    def scale(self) -> torch.Tensor:
        """The log-temperature actually used (clamped; the gradient stops at the cap)."""
        return self.logit_scale.clamp(max=self.max_scale)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, E), (B_txt, E), both normalised -> (B_img, B_txt) scaled cosine similarities."""
        return self.scale().exp() * image_embeds @ text_embeds.T

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, *, gather: bool = False,
                local_loss: bool = False) -> torch.Tensor:
        """The loss of the pairs (row i of each side) and the extra texts after them. gather: under torchrun,
        over every process's rows (`gather_batch`); local_loss: score only this process's rows against all
        of them, times the number of processes (see `_gathered`)."""
        if gather and world_size() > 1:
            return _gathered(lambda i, t, rows=None: clip_loss(i, t, self.scale(), rows=rows),
                             image_embeds, text_embeds, local_loss)
        return clip_loss(image_embeds, text_embeds, self.scale())


class SigmoidLoss(nn.Module):
    """Holds SigLIP's learnable temperature (log 10 at init) and bias (-10 at init)."""

    def __init__(self, init_scale: float = math.log(10.0), init_bias: float = -10.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B_img, E), (B_txt, E), both normalised -> (B_img, B_txt) pair logits; sigmoid gives P(match)."""
        return self.logit_scale.exp() * image_embeds @ text_embeds.T + self.logit_bias

    def forward(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, *, gather: bool = False,
                local_loss: bool = False) -> torch.Tensor:
        """As ContrastiveLoss.forward. Gathered, the sigmoid loss covers all (B, B + N) pairs of the whole
        batch at once; SigLIP's chunked exchange (each process passing its texts round a ring) saves memory
        at scale, but gives the same loss, and one gather suffices here."""
        if gather and world_size() > 1:
            return _gathered(lambda i, t, rows=None: siglip_loss(i, t, self.logit_scale, self.logit_bias, rows=rows),
                             image_embeds, text_embeds, local_loss)
        return siglip_loss(image_embeds, text_embeds, self.logit_scale, self.logit_bias)
