"""The update stage: one GRPO optimizer step of a DeepSpeed engine over this rank's shard of a scored batch.

How a step runs on every rank:
1. ``shard_rows``: the batch's completions are dealt to ranks so each gets about the same number of tokens
   (greedy, longest first; deterministic, so every rank computes the same split without talking).
2. ``plan_micro_batches``: the rank's rows are packed into micro-batches whose padded size
   (rows x (longest prompt + longest completion)) stays within ``micro_batch_tokens``, so 4k-token completions
   go one or two per micro-batch while short ones are packed by the dozen. ``collate`` stores each distinct
   prompt once; with ``share_prompts`` the log-prob pass runs it once and scores its completions on its cached
   keys/values (``trainer/logprobs.grouped_completion_logprobs``): the budget above still counts every row
   as prompt + completion, so sharing only ever makes a micro-batch smaller than planned.
3. All ranks must run the same number of forward/backward passes (ZeRO gathers parameters in forward and
   reduce-scatters gradients in backward), so the micro-batch count is max-reduced and short ranks run
   padding passes whose loss is multiplied by 0.
4. Each micro-batch loss is normalised with the counts of the WHOLE step (``LossNormalizer``), so the sum over
   micro-batches and DeepSpeed's average over ranks is the full-batch loss; ``backward(scale_wrt_gas=False)``.
5. ``engine.step()`` clips by the global norm and steps AdamW and the LR schedule. DeepSpeed's ZeRO optimizers
   skip the step (no parameter or schedule change, ``was_step_applied() == False``) when the global gradient
   norm is not finite; the norm is all-reduced, so all ranks agree on the skip.

The engine runs with ``managed_gradient_accumulation: false``: ``step()`` is the accumulation boundary, so the
number of micro-batches may change from step to step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.distributed import all_reduce_scalar
from trainer.logprobs import grouped_completion_logprobs
from trainer.loss import LossConfig, LossNormalizer, grpo_loss, loss_metric_keys


class LogprobPolicy(torch.nn.Module):
    """The HF causal LM whose ``forward`` returns completion log-probs (and entropy).

    Why a wrapper: DeepSpeed's per-micro-batch bookkeeping (ZeRO's backward-phase flags, the backward prologue
    hooks) runs in ``engine.forward``; calling the inner model directly made ZeRO-3 accumulate wrong gradients
    over several micro-batches (measured: every parameter off by ~5-30%). Wrapping keeps every forward inside
    ``engine(...)`` while still never materialising full logits. The HF model is ``.model``.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        prompt_index: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_attn: torch.Tensor,
        temperature: float = 1.0,
        chunk_tokens: int = 1024,
        with_entropy: bool = False,
        share_prompts: bool = True,
    ):
        return grouped_completion_logprobs(
            self.model,
            prompt_ids,
            prompt_mask,
            prompt_index,
            completion_ids,
            completion_attn,
            temperature,
            chunk_tokens,
            with_entropy,
            share_prompts,
        )


@dataclass
class TrainRow:
    """One completion as the update stage needs it (plain lists: cheap to broadcast)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    rollout_logprobs: list[float]
    loss_mask: bool = True  # False = left out of the loss (masked truncated completion)


@dataclass
class TrainBatch:
    """What rank 0 broadcasts to every rank for one step."""

    step: int
    rows: list[TrainRow]
    nan_loss: bool = False  # debug hook: make this step's loss NaN
    nan_loss_rank: int | None = None  # ... on this rank only (None = all ranks)
    stop_reason: str | None = None  # set instead of rows when the run must stop on every rank
    stale: str | None = None  # set instead of rows when a server lost its weights (restarted): why


@dataclass
class UpdateResult:
    applied: bool
    grad_norm: float
    lr: float
    loss: float
    num_micro_batches: int
    nonfinite_loss: bool
    metrics: dict[str, float] = field(default_factory=dict)


def shard_rows(lengths: list[int], world_size: int, rank: int) -> list[int]:
    """Indices of the rows this rank trains on: longest first to the least-loaded rank (ties: lowest rank)."""
    load = [0] * world_size
    owner = [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += lengths[i]
    return [i for i in range(len(lengths)) if owner[i] == rank]


def plan_micro_batches(rows: list[TrainRow], indices: list[int], budget_tokens: int) -> list[list[int]]:
    """Split ``indices`` into micro-batches with rows x (max prompt + max completion) <= budget.

    Rows are sorted by length so similar lengths share a micro-batch (little padding). A single row longer than
    the budget gets a micro-batch of its own (it cannot be split).
    """
    order = sorted(indices, key=lambda i: (-(len(rows[i].prompt_ids) + len(rows[i].completion_ids)), i))
    batches: list[list[int]] = []
    cur: list[int] = []
    max_p = max_c = 0
    for i in order:
        p, c = len(rows[i].prompt_ids), max(len(rows[i].completion_ids), 1)
        new_p, new_c = max(max_p, p), max(max_c, c)
        if cur and (len(cur) + 1) * (new_p + new_c) > budget_tokens:
            batches.append(cur)
            cur, new_p, new_c = [], p, c
        cur.append(i)
        max_p, max_c = new_p, new_c
    if cur:
        batches.append(cur)
    return batches


@dataclass
class MicroBatch:
    """Rows as distinct prompts + completions: row b continues prompt ``prompt_index[b]`` (GRPO's G completions
    of a prompt share one copy, so the log-prob pass can run each prompt once)."""

    prompt_ids: torch.Tensor  # [U, Lp] distinct prompts, left-padded
    prompt_mask: torch.Tensor  # [U, Lp]
    prompt_index: torch.Tensor  # [B] long: which prompt each row continues
    completion_ids: torch.Tensor  # [B, K] right-padded
    completion_attn: torch.Tensor  # [B, K] 1 on real completion tokens
    completion_mask: torch.Tensor  # [B, K] 1 on tokens that count in the loss
    advantages: torch.Tensor  # [B]
    rollout_logprobs: torch.Tensor  # [B, K] NaN where unknown / padding

    @property
    def num_completion_tokens(self) -> int:
        return self.completion_ids.shape[1]


def collate(rows: list[TrainRow], pad_id: int, device: torch.device) -> MicroBatch:
    """Distinct prompts left-padded, completions right-padded: row b is [pad.. prompt | completion ..pad]."""
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(r.prompt_ids), len(distinct)) for r in rows]
    lp = max(len(p) for p in distinct)
    k = max(max(len(r.completion_ids) for r in rows), 1)
    b = len(rows)
    pids = torch.full((len(distinct), lp), pad_id, dtype=torch.long)  # [U, Lp]
    pmask = torch.zeros((len(distinct), lp), dtype=torch.long)  # [U, Lp]
    for u, p in enumerate(distinct):
        if p:
            pids[u, lp - len(p) :] = torch.tensor(p, dtype=torch.long)
            pmask[u, lp - len(p) :] = 1
    cids = torch.full((b, k), pad_id, dtype=torch.long)  # [B, K]
    cattn = torch.zeros((b, k), dtype=torch.long)  # [B, K]
    cmask = torch.zeros((b, k), dtype=torch.float32)  # [B, K]
    rlp = torch.full((b, k), float("nan"), dtype=torch.float32)  # [B, K]
    for j, r in enumerate(rows):
        c = len(r.completion_ids)
        if c:
            cids[j, :c] = torch.tensor(r.completion_ids, dtype=torch.long)
            cattn[j, :c] = 1
            if r.loss_mask:
                cmask[j, :c] = 1.0
            if r.rollout_logprobs:
                rlp[j, : len(r.rollout_logprobs)] = torch.tensor(r.rollout_logprobs[:c], dtype=torch.float32)
    adv = torch.tensor([r.advantage for r in rows], dtype=torch.float32)  # [B]
    return MicroBatch(
        prompt_ids=pids.to(device),
        prompt_mask=pmask.to(device),
        prompt_index=torch.tensor(index, dtype=torch.long, device=device),
        completion_ids=cids.to(device),
        completion_attn=cattn.to(device),
        completion_mask=cmask.to(device),
        advantages=adv.to(device),
        rollout_logprobs=rlp.to(device),
    )


def make_normalizer(rows: list[TrainRow], max_completion_length: int, world_size: int) -> LossNormalizer:
    """Counts of the whole step (every rank's rows), identical on all ranks."""
    return LossNormalizer(
        total_sequences=max(len(rows), 1),
        total_completion_tokens=sum(len(r.completion_ids) for r in rows if r.loss_mask),
        max_completion_length=max_completion_length,
        num_ranks=world_size,
    )


class UpdateStage:
    """Runs optimizer steps of ``engine`` (a DeepSpeed engine) on broadcast TrainBatches."""

    def __init__(
        self,
        engine,
        loss_config: LossConfig,
        *,
        pad_id: int,
        temperature: float,
        chunk_tokens: int,
        micro_batch_tokens: int,
        max_completion_length: int,
        rank: int,
        world_size: int,
        device: torch.device,
        ref_model=None,
        share_prompts: bool = True,
    ):
        self.engine = engine
        self.share_prompts = share_prompts
        self.loss_config = loss_config
        self.pad_id = pad_id
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.micro_batch_tokens = micro_batch_tokens
        self.max_completion_length = max_completion_length
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.ref_model = ref_model

    def _logprobs(self, model, mb: MicroBatch, with_entropy: bool):
        """``model`` is the DeepSpeed engine (or reference engine/module) wrapping a LogprobPolicy."""
        return model(
            mb.prompt_ids,
            mb.prompt_mask,
            mb.prompt_index,
            mb.completion_ids,
            mb.completion_attn,
            temperature=self.temperature,
            chunk_tokens=self.chunk_tokens,
            with_entropy=with_entropy,
            share_prompts=self.share_prompts,
        )

    def _padding_batch(self) -> MicroBatch:
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)  # [1, 1]
        zeros = torch.zeros((1, 1), device=self.device)  # [1, 1]
        index = torch.zeros(1, dtype=torch.long, device=self.device)  # [1]
        return MicroBatch(
            ids, torch.ones_like(ids), index, ids, torch.ones_like(ids), zeros, zeros[:, 0], zeros
        )

    def _padding_pass(self) -> None:
        """A forward/backward that contributes zero gradient, so every rank runs the same number of passes."""
        lp, _ = self._logprobs(self.engine, self._padding_batch(), False)  # [1, 1]
        self.engine.backward(lp.sum() * 0.0, scale_wrt_gas=False)

    def step(self, batch: TrainBatch) -> UpdateResult:
        """One optimizer step per ``num_iterations`` (old log-probs from the first pass); returns the last one."""
        rows = batch.rows
        mine = shard_rows(
            [len(r.prompt_ids) + len(r.completion_ids) for r in rows], self.world_size, self.rank
        )
        plan = plan_micro_batches(rows, mine, self.micro_batch_tokens)
        n_passes = int(all_reduce_scalar(len(plan), "max"))
        normalizer = make_normalizer(rows, self.max_completion_length, self.world_size)
        micro = [collate([rows[i] for i in mb], self.pad_id, self.device) for mb in plan]

        old_lps: list[torch.Tensor | None] = [None] * len(micro)
        ref_lps: list[torch.Tensor | None] = [None] * len(micro)
        if self.loss_config.num_iterations > 1 or self.loss_config.beta > 0:
            with torch.no_grad():
                for j in range(n_passes):
                    mb = micro[j] if j < len(micro) else None
                    if self.loss_config.num_iterations > 1:
                        if mb is None:  # keep ZeRO-3 gathers in step across ranks
                            self._padding_forward(self.engine)
                        else:
                            old_lps[j] = self._logprobs(self.engine, mb, False)[0]
                    if self.loss_config.beta > 0:
                        if mb is None:
                            self._padding_forward(self.ref_model)
                        else:
                            ref_lps[j] = self._logprobs(self.ref_model, mb, False)[0]

        result = None
        for _ in range(self.loss_config.num_iterations):
            result = self._one_optimizer_step(batch, micro, n_passes, normalizer, old_lps, ref_lps)
        assert result is not None
        return result

    def _padding_forward(self, model) -> None:
        self._logprobs(model, self._padding_batch(), False)

    def _one_optimizer_step(self, batch, micro, n_passes, normalizer, old_lps, ref_lps) -> UpdateResult:
        engine = self.engine
        sums: dict[str, float] = {}
        total_tokens = 0.0
        loss_sum = 0.0
        nonfinite = False
        for j in range(n_passes):
            if j >= len(micro):
                self._padding_pass()
                continue
            mb = micro[j]
            logprobs, entropy = self._logprobs(engine, mb, True)  # [B, K], [B, K]
            out = grpo_loss(
                logprobs,
                mb.advantages,
                mb.completion_mask,
                old_logprobs=old_lps[j],
                ref_logprobs=ref_lps[j],
                rollout_logprobs=mb.rollout_logprobs if self.loss_config.importance_sampling_cap else None,
                entropy=entropy,
                config=self.loss_config,
                normalizer=normalizer,
            )
            loss = out.loss
            if batch.nan_loss and batch.nan_loss_rank in (None, self.rank):
                loss = loss * float("nan")  # debug hook: the step must be skipped, not applied
            if not torch.isfinite(loss.detach()):
                nonfinite = True
            engine.backward(loss, scale_wrt_gas=False)
            loss_sum += float(loss.detach()) / self.world_size
            n_tok = float(out.metrics["num_tokens"])
            total_tokens += n_tok
            for k, v in out.metrics.items():
                if k not in ("num_tokens", "loss"):
                    sums[k] = sums.get(k, 0.0) + float(v) * n_tok
        engine.step()
        applied = bool(engine.was_step_applied())
        nonfinite = all_reduce_scalar(1.0 if nonfinite else 0.0, "max") > 0
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # Token-weighted means over all ranks' micro-batches: one all-reduce of a fixed key list (a rank with
        # only padding passes has no metrics of its own but must join the same collective).
        keys = loss_metric_keys(self.loss_config)
        vec = torch.tensor(
            [sums.get(k, 0.0) for k in keys] + [total_tokens, loss_sum],
            dtype=torch.float64,
            device=self.device,
        )
        if self.world_size > 1:
            torch.distributed.all_reduce(vec)
        vec = vec.cpu()
        all_tokens = float(vec[-2])
        metrics = {k: float(vec[i]) / max(all_tokens, 1.0) for i, k in enumerate(keys)}
        return UpdateResult(
            applied=applied,
            grad_norm=grad_norm,
            lr=float(engine.get_lr()[0]),
            loss=float(vec[-1]),
            num_micro_batches=n_passes,
            nonfinite_loss=nonfinite,
            metrics=metrics,
        )
