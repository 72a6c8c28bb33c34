"""``PiggyModule``: a trainable causal-LM policy paired with its frozen reference.

The training loss is cross-entropy on response tokens plus the weighted sum of the configured regularizers
(``model.regularizers``; an empty list is plain SFT). Weights load in :meth:`PiggyModule.configure_model`, so
building the module from a config is instant. Checkpoints hold only trainable tensors (the LoRA adapter, or the
policy under full finetuning) plus optimizer state; the frozen base weights and the reference are rebuilt from
``model_name_or_path``.

To run: ``python main.py fit --config configs/treft_legal.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from piggy_lightning.data.sampling import check_position_restored
from piggy_lightning.fsdp import check_strategy, data_parallel_mesh, load_sharded
from piggy_lightning.losses import record_cross_entropy, regularizer_inputs, response_cross_entropy, setup_regularizers
from piggy_lightning.modeling import DType, LoraSpec, build_policy, load_tokenizer
from piggy_lightning.optim import Schedule
from piggy_lightning.reference import AdaptersOffReference, FrozenCopyReference, InitialReference, Reference
from piggy_lightning.regularizer import Regularizer, RegularizerContext
from piggy_lightning.sites import decoder_layers
from piggy_lightning.spans import ChatSpans

__all__ = ["PiggyModule", "response_cross_entropy"]


class PiggyModule(L.LightningModule):
    """Finetunes a causal LM with optional regularization toward its frozen initial self.

    Args:
        model_name_or_path: A transformers model id or directory, or ``piggy/organism`` for the embedded default.
        lora: LoRA settings; None means full finetuning (the reference is then a frozen copy).
        regularizers: Penalties added to the response cross-entropy (e.g. TReFT's prefix KV drift).
        optimizer: Optimizer class and arguments; receives the trainable parameters only.
        scheduler: Optional learning-rate schedule (e.g. ``piggy_lightning.optim.CosineWithWarmup``) over the
            trainer's estimated number of optimizer steps, stepped every optimizer step (see
            :meth:`configure_optimizers`).
        dtype: Weight dtype at load time; use ``trainer.precision: bf16-mixed`` for mixed precision instead.
        gguf_file: File name inside ``model_name_or_path`` when loading a GGUF checkpoint.
        chat_template_kwargs: Extra ``apply_chat_template`` arguments (e.g. ``{"enable_thinking": false}``).
        gradient_checkpointing: Recompute activations in the backward pass to save memory (non-reentrant, so the
            key/value hooks that TReFT records keep their gradients).
        generation_suffix: Text appended to generation prompts (evaluation), e.g. ``<|channel|>final<|message|>`` so
            that GPT-OSS answers in its final channel as in the paper's code; it counts as postfix.
        postfix_exclude: Template text ending a postfix that is labelled ``other`` instead (e.g. Qwen3's empty
            think block, which the release's patching code excludes); None keeps the whole postfix.
        init: ``pretrained`` loads the weights; ``random`` builds the model from its config, seeded by
            ``seed_everything`` (used to pretrain the embedded organism).
        adapter: A LoRA export directory (written by ``ExportPretrained``) loaded over ``model_name_or_path`` with
            peft, not trainable, to evaluate it without training: ``main.py test --model.adapter <dir>``. The
            reference is the base model (the adapter off). ``lora`` is then unused (the export's
            ``adapter_config.json`` has the settings), so the fit's own config serves unchanged. Not for ``fit``.
    """

    def __init__(
        self,
        model_name_or_path: str = "piggy/organism",
        lora: LoraSpec | None = None,
        regularizers: list[Regularizer] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: Schedule | None = None,
        dtype: DType = "float32",
        gguf_file: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        gradient_checkpointing: bool = False,
        generation_suffix: str | None = None,
        postfix_exclude: str | None = None,
        init: Literal["pretrained", "random"] = "pretrained",
        adapter: str | None = None,
    ) -> None:
        super().__init__()
        # plain types only in hparams, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["regularizers", "optimizer", "scheduler", "lora"])
        self.hparams["lora"] = asdict(lora) if lora is not None else None
        self.model_name_or_path = model_name_or_path
        self.lora = lora
        self.adapter = adapter
        self.regularizers = torch.nn.ModuleList(regularizers or [])
        names = [r.name for r in self.regularizers]
        if len(set(names)) != len(names):
            raise ValueError(f"regularizer names must be unique for logging, got {names}")
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.dtype_name = dtype
        self.gguf_file = gguf_file
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.init = init
        self.generation_suffix = generation_suffix
        self.postfix_exclude = postfix_exclude
        self.gradient_checkpointing = gradient_checkpointing
        self.policy: torch.nn.Module | None = None
        self.reference: Reference | None = None
        self.tokenizer = None
        self.spans: ChatSpans | None = None
        self.strict_loading = False  # checkpoints omit frozen weights; on_load_checkpoint checks the rest
        self._saved_loader_states: list[dict[str, Any]] = []  # the train loaders' positions in a loaded checkpoint

    # -- building ----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the policy, wrap it with LoRA (or the exported ``adapter``) and build the reference; runs once.

        Under ``ModelParallelStrategy`` (Lightning sets ``self.device_mesh``) every network is built sharded
        (``piggy_lightning/fsdp.py``: a meta-device skeleton on every rank, the weights read on rank 0 and
        broadcast), and the regularizers' one-off reference forwards run after that, on every rank alike.
        """
        if self.policy is not None:
            return
        self.tokenizer = load_tokenizer(self.model_name_or_path, self.gguf_file)
        self.spans = ChatSpans(self.tokenizer, self.chat_template_kwargs, self.generation_suffix, self.postfix_exclude)
        self.policy = self._build(wrapped=True)
        if self.adapter is not None:  # the adapter is this module's trained state, as in the fit that exported it:
            for name, p in self.policy.named_parameters():  # the evaluation's weights digest reads requires_grad
                p.requires_grad_("lora_" in name)
        if self.lora is not None or self.adapter is not None:
            self.reference = AdaptersOffReference(self.policy)
        elif self._reference_kept_live():
            if self.device_mesh is None:
                self.reference = FrozenCopyReference(self.policy)
                self.reference_model = self.reference.model  # registered so strategies move it; never saved
            elif self.init == "pretrained":  # a deep copy would share the policy's FSDP state: loaded and sharded
                self.reference = FrozenCopyReference(self.policy, build=self._rebuild_initial)  # on its own, unsaved
            else:
                raise ValueError(
                    "a sharded policy with random initial weights has no source to load its reference from"
                )
        else:  # no frozen copy: the untrained policy serves the regularizers' setup, then a rebuild on demand
            self.reference = InitialReference(self.policy, self._rebuild_initial if self.init == "pretrained" else None)
        self.policy.train()
        # regularizers get facts, not networks; the data module's encoder (set up before configure_model) lets
        # them read extra data exactly as the training rows are read
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        context = RegularizerContext(
            spans=self.spans,
            tokenizer=self.tokenizer,
            n_layers=len(decoder_layers(self.policy)),
            device=next(self.policy.parameters()).device,
            encode=getattr(datamodule, "encode", None),
        )
        setup_regularizers(self.regularizers, context, self.reference)
        self.reference.seal()

    def _build(self, wrapped: bool) -> torch.nn.Module:
        """The base model (``wrapped``: with gradient checkpointing and LoRA or the adapter), sharded over the
        device mesh when there is one (a collective then: every rank calls it)."""
        args = (self.model_name_or_path, self.dtype_name, self.gguf_file, self.init)
        extras = (self.lora, self.adapter, self.gradient_checkpointing) if wrapped else (None, None, False)
        if self.device_mesh is None:
            return build_policy(*args, *extras)
        mesh = data_parallel_mesh(self.device_mesh)
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device(mesh.device_type)
        load, skeleton = (lambda: build_policy(*args, *extras)), (lambda: build_policy(*args, *extras, skeleton=True))
        return load_sharded(load, skeleton, mesh, device)

    def _reference_kept_live(self) -> bool:
        """Whether full finetuning must hold a frozen copy of the initial policy during the run.

        Yes when a regularizer uses the reference in steps (``keeps_reference``) or a trainer callback declares
        ``needs_reference`` (patching evaluations, the drift monitor): once training starts the initial weights
        exist only in that copy. Also yes outside a trainer, where nobody can say who will use it. Otherwise no
        copy is held (the whole model's memory saved), and a later use rebuilds the reference from the source.
        """
        if self._trainer is None:
            return True
        callbacks = getattr(self._trainer, "callbacks", [])
        return any(r.keeps_reference for r in self.regularizers) or any(
            getattr(c, "needs_reference", False) for c in callbacks
        )

    def _rebuild_initial(self) -> torch.nn.Module:
        """The initial policy loaded again from ``model_name_or_path`` (sharded like the policy: a collective)."""
        return self._build(wrapped=False)

    def setup(self, stage: str) -> None:
        """Refuse a fit that trains nothing (``max_epochs``, ``max_steps`` or ``limit_train_batches`` of 0).

        Refused rather than warned about: such a fit ends at once with exit status 0, and fit-end callbacks report
        the untrained base model as the trained one (``Evaluate`` writes it as ``fit_end``), a wrong result that
        looks like a right one, while a warning scrolls past in the log. The base model is measured on purpose with
        ``Evaluate(at=[train_start])`` or ``main.py test`` without ``--ckpt_path``. Rerunning a finished run is
        allowed: its step budget is not zero, it is spent.
        """
        check_strategy(self.trainer.strategy)
        if stage != "fit":
            return
        if self.adapter is not None:
            raise ValueError(
                f"model.adapter ({self.adapter!r}) evaluates an exported adapter as it is (main.py test/validate); a "
                "fit trains a new one from model.lora"
            )
        trainer = self.trainer
        budget = {
            "max_epochs": trainer.max_epochs,
            "max_steps": trainer.max_steps,
            "limit_train_batches": trainer.limit_train_batches,
        }
        zero = [f"trainer.{k}={v}" for k, v in budget.items() if v == 0]
        if zero:
            raise ValueError(
                f"{', '.join(zero)} trains nothing: the fit would end at once and report the untrained model as "
                "its result (fit_end); to evaluate the base model use Evaluate(at=[train_start]) or `main.py test` "
                "without --ckpt_path"
            )

    def train(self, mode: bool = True) -> PiggyModule:
        super().train(mode)
        if getattr(self, "reference_model", None) is not None:
            self.reference_model.eval()  # the frozen copy never leaves eval mode
        return self

    @property
    def trainable_parameter_names(self) -> list[str]:
        """Names (as in ``state_dict``) of the parameters the optimizer updates."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # -- steps -------------------------------------------------------------------------------------------
    def _progress(self) -> float:
        """Fraction of the fit's optimizer steps done; 0 outside fit (validate/test may have no step budget).

        Only read in training steps, when the fit loop has built (and on resume restored) the train dataloader, so
        ``estimated_stepping_batches`` never builds it early here (see :meth:`on_train_start`).
        """
        if self._trainer is None or not self.trainer.training:
            return 0.0
        total = self.trainer.estimated_stepping_batches
        return min(1.0, self.global_step / total) if total and math.isfinite(total) else 0.0

    def _losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        policy_out, inputs = regularizer_inputs(self.policy, self.reference, list(self.regularizers), batch)
        ce = record_cross_entropy(policy_out, batch["labels"])
        losses = {"ce": ce}
        total = ce
        progress = self._progress()
        for reg, given in zip(self.regularizers, inputs, strict=True):
            raw = reg(given.batch, given.policy, given.reference)
            weighted = reg.weighted(raw, progress)
            losses[f"reg_raw/{reg.name}"] = raw.detach()
            losses[f"reg/{reg.name}"] = weighted.detach()
            total = total + weighted
        losses["loss"] = total
        return losses

    flops_per_batch: float | None = None  # read by Lightning's ThroughputMonitor (added by the CLI); not measured

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses = self._losses(batch)
        batch_size = batch["input_ids"].size(0)
        # synced: under DDP each rank holds a share of the batch, and the logged loss is the mean over ranks
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, batch_size=batch_size, sync_dist=True)
        return losses["loss"]

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> None:
        losses = self._losses(batch)
        batch_size = batch["input_ids"].size(0)
        self.log_dict(
            {f"{stage}/{k}": v for k, v in losses.items()}, on_epoch=True, batch_size=batch_size, sync_dist=True
        )

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Held-out loss; generation-based evaluation runs in the ``Evaluate`` callback at test end."""
        self._eval_step(batch, "test")

    # -- optimization ------------------------------------------------------------------------------------
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """Step, then free the gradients at once: Lightning zeroes them only after the next forward, so they would
        sit beside that forward's activations (one model's worth of memory at the peak; ``benchmarks/memory_sft.py``).
        Under gradient accumulation this runs at the accumulation boundary only, after the grads were used."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self) -> Any:
        """The optimizer over the trainable parameters and, with ``scheduler``, its schedule over the fit's steps.

        The step count is ``trainer.estimated_stepping_batches`` (gradient accumulation, devices, ``max_steps`` and
        ``limit_train_batches`` included). Reading it here builds the train dataloader before the checkpoint restores
        the loops, and Lightning then never hands that loader the checkpoint's position (Lightning #20550): with a
        plain ``StatefulDataLoader``, resumes at steps 3 and 7 of 15 trained other batches than the uninterrupted
        run. So ``ChatSFTDataModule`` keeps the position in its own checkpoint state, which Lightning restores before
        this hook, and builds the loader at it: the resume stays bit-identical (``tests/test_resume_shipped.py``).
        Building the schedule later, at train start, would instead mean restoring its state and the optimizer's
        learning rates by hand. :meth:`on_train_start` raises if a mid-epoch position still misses the loader (a data
        module without that state; FSDP and DeepSpeed, which restore checkpoints after this hook).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                f"{type(self.scheduler_factory).__name__} needs a finite fit: set trainer.max_steps or max_epochs"
            )
        scheduler = self.scheduler_factory(optimizer, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        """Raise if a mid-epoch checkpoint's position did not reach the train dataloader (``data/sampling.py``), which
        would restart the epoch's order instead of continuing it (see :meth:`configure_optimizers`)."""
        saved, self._saved_loader_states = self._saved_loader_states, []
        trainer = self.trainer
        check_position_restored(trainer.train_dataloader, saved, trainer.num_training_batches, trainer.current_epoch)

    # -- checkpoints -------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the trainable tensors only, except in a distributed (sharded) checkpoint.

        ``ModelParallelStrategy`` with ``save_distributed_checkpoint: true`` saves each rank's shards (DTensors) and
        loads them back with ``torch.distributed.checkpoint.load``, which refuses a checkpoint that lacks any tensor
        of the model: such a checkpoint keeps the frozen base's shards too (see ``docs/distributed.md``). With
        ``false`` rank 0 receives the full state dict (the other ranks an empty one) and it is filtered as usual.
        """
        from torch.distributed.tensor import DTensor

        state = checkpoint["state_dict"]
        if any(isinstance(v, DTensor) for v in state.values()):
            return
        keep = set(self.trainable_parameter_names)
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # ModelParallelStrategy loads the weights itself (all of them, or strict=False) and pops them from the dict
        saved = checkpoint.get("state_dict")
        missing = set(self.trainable_parameter_names) - set(saved) if saved is not None else set()
        if self.policy is not None and missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._saved_loader_states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))
