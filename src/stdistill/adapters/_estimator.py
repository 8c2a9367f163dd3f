"""The estimator shared by recipes that adapt an image encoder: build, train, run, save, load.

A recipe subclasses :class:`AdaptedEncoder`, sets its config class, file format, head prefixes and
LightningModule, and writes ``fit`` (its targets and heads) and ``_net_from_state`` (rebuilding
its net on load) from the steps here.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn

from .._errors import StdistillError
from .._utils import check_state
from ..bundle import Bundled
from ..select import Selection, selection_record
from ._config import AdapterConfig
from ._cut import parse_cut
from ._module import TailModule, trainable_key
from ._peft import add_adapter
from ._trunk import Tail, trunk_activations


def as_input(h: torch.Tensor) -> torch.Tensor:
    """Cached activations as the tail's input: float32, or uint8 patches as they are."""
    return h if h.dtype == torch.uint8 else h.float()


def _check_strategy(strategy) -> None:
    """Refuse Lightning strategies that train in child processes (``ddp_spawn``, ``ddp_fork``, ...):
    the history and best epoch of a child cannot come back to the estimator."""
    name = strategy if isinstance(strategy, str) else getattr(strategy, "strategy_name", "")
    if any(w in str(name) for w in ("spawn", "fork", "notebook")):
        raise StdistillError(f"strategy {name!r} trains in child processes whose validation history and best epoch "
                             'cannot return to the estimator; use strategy="ddp" (Lightning re-runs the script for the '
                             "other processes, or start them with torchrun/srun)")


def _train_loader(n: int, batch_size: int, world: int, g: torch.Generator) -> torch.utils.data.DataLoader:
    """Shuffled batches of spot indices ``0..n-1``; under DDP (``world`` processes) Lightning swaps in
    its distributed sampler and each process takes ``batch_size / world`` spots, so the effective
    batch is ``batch_size`` whatever the number of processes."""
    bs = max(1, -(-batch_size // max(world, 1)))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(n)), batch_size=bs,
                                       shuffle=True, generator=g, drop_last=n > batch_size)


class AdaptedEncoder(Bundled):
    """Base estimator: an encoder with a peft adapter after a cut, trained on cached trunk activations.

    Parameters
    ----------
    encoder
        Encoder name (``stdistill.encoders``) or a loaded :class:`~stdistill.encoders.Encoder`
        (copied; the original is not modified). The offline default is an ImageNet model.
    config
        The recipe's config (an :class:`AdapterConfig`); keyword ``overrides`` replace its fields.
    device, accelerator, devices, strategy, num_nodes
        Trunk caching device and Lightning's settings: ``devices=2, strategy="ddp", accelerator="cpu"``
        trains on 2 CPU processes (gloo), ``accelerator="gpu", devices=4, strategy="ddp"`` on 4 GPUs;
        on a cluster start one process per device with ``torchrun``/``srun`` and pass the same
        values (and ``num_nodes``). Each process takes ``batch_size / world size`` spots per step
        (the effective batch is unchanged), every process scores the whole validation set, and
        the fitted estimator holds the final weights in every process. Lightning starts the other
        processes by re-running the script: keep ``fit`` under ``if __name__ == "__main__":``.
    cache_dir
        Trunk-activation cache (see :func:`stdistill.adapters.trunk_activations`).

    With ``config.stain_norm``, ``fit`` sets ``stain_`` (method, reference estimate and its training
    section), saved with the model: ``transform``/``predict`` normalise every slide onto it.
    """

    config_class: type[AdapterConfig] = AdapterConfig
    module_class: type[TailModule] = TailModule
    _bundle_format: str = ""
    heads: tuple[str, ...] = ()  # state-dict prefixes of the heads
    targets_key: str = "targets"  # regression targets' names: fitted attribute ``<targets_key>_`` and metadata key
    buffers: tuple[str, ...] = ("feat_mu", "feat_sd")  # non-trainable net state saved with the model

    def __init__(self, encoder="effnet-lite0-imagenet", config: AdapterConfig | None = None, *, device: str = "cpu",
                 accelerator: str = "cpu", devices="auto", strategy: str = "auto", num_nodes: int = 1,
                 cache_dir: str | os.PathLike | bool | None = None, **overrides):
        _check_strategy(strategy)
        self.config = replace(config or self.config_class(), **overrides)
        self.encoder_arg = encoder
        self.device, self.accelerator, self.devices, self.strategy = device, accelerator, devices, strategy
        self.num_nodes = int(num_nodes)
        self.cache_dir = cache_dir

    # -------------------------------------------------------------- building
    def _load_encoder(self):
        from .. import encoders

        if isinstance(self.encoder_arg, str):
            return encoders.load(self.encoder_arg, device="cpu")
        return copy.deepcopy(self.encoder_arg).cpu()

    def _frozen_encoder(self):
        if not hasattr(self, "_frozen"):
            self._frozen = self._load_encoder().eval()
        return self._frozen

    def _activations(self, adata: ad.AnnData):
        """Trunk activations: one tensor, or read per section from the disk cache when indexed
        (:class:`~stdistill.adapters._trunk.SectionActivations`) past the memory budget."""
        # computing activations (a cache miss) draws from torch's global RNG (DataLoader seeds); reading
        # them does not: fork it, so the adapter's init, and the fitted model, do not depend on whether
        # the trunk cache was warm (the same command gives the same numbers on its second run)
        with torch.random.fork_rng(devices=[]):
            return trunk_activations(self._frozen_encoder(), adata, self.config, cache_dir=self.cache_dir,
                                     device=self.device, lazy="auto", stain=self._stain_normalizer())

    def _fit_stain(self, adata: ad.AnnData) -> None:
        """Set ``stain_`` from the training spots (:func:`~stdistill.adapters.stain_reference`: the
        method, the reference estimate and its training section); None without ``config.stain_norm``.
        Every later :meth:`_activations` normalises onto this reference."""
        from ._trunk import stain_reference

        ref = stain_reference(adata, self.config)
        self.stain_ = None if ref is None else {**ref[0].state(), "reference_section": ref[1]}

    def _stain_normalizer(self):
        """The fitted stain reference as a :class:`~stdistill.pp.StainNormalizer`, or None."""
        from ..pp._stain import StainNormalizer

        state = getattr(self, "stain_", None)
        if self.config.stain_norm is None:
            return None
        if state is None:
            raise StdistillError(f"{type(self).__name__} has stain_norm={self.config.stain_norm!r} but no fitted stain "
                                 "reference; call fit() first (or load a saved model)")
        if state["method"] != self.config.stain_norm:
            raise StdistillError(f"the stain reference was fitted with {state['method']!r}, but stain_norm is "
                                 f"{self.config.stain_norm!r}")
        return StainNormalizer.from_state(state)

    def _adapted_tail(self) -> Tail:
        """A copy of the frozen encoder with the adapter inserted, as the tail after the cut."""
        frozen = self._frozen_encoder()
        enc = copy.deepcopy(frozen)  # the adapted copy shares the frozen trunk's weights exactly
        self.adapter_info_ = add_adapter(enc.backbone, self.config)
        return Tail(enc, parse_cut(frozen.backbone, self.config.train_from))

    def _standardize_targets(self, Y: np.ndarray) -> np.ndarray:
        """Store the targets' mean and sd (``y_mean_``, ``y_std_``) and return them z-scored."""
        self.y_mean_, self.y_std_ = Y.mean(0), Y.std(0)
        self.y_std_[self.y_std_ == 0] = 1.0
        return (Y - self.y_mean_) / self.y_std_

    @staticmethod
    @torch.no_grad()
    def _init_scaling(net: nn.Module, H: torch.Tensor) -> torch.Tensor:
        """Set ``net.feat_mu``/``feat_sd`` from the frozen features of ``H``; return them standardised."""
        net.eval()
        F0 = torch.cat([net.tail(as_input(H[i:i + 256, 0])) for i in range(0, len(H), 256)]).float()
        net.feat_mu.copy_(F0.mean(0))
        net.feat_sd.copy_(F0.std(0).clamp_min(1e-6))
        return (F0 - net.feat_mu) / net.feat_sd

    # -------------------------------------------------------------- training
    def _stage(self, run_dir: str | os.PathLike, data: dict, val: dict | None) -> Path:
        """The checkpoint folder of this training (:func:`stdistill._resume.stage_dir`): its
        fingerprint covers the recipe, config, encoder weights and every input tensor."""
        from .._resume import stage_dir

        enc = self._frozen_encoder()
        settings = [type(self).__name__, self.config.record(), enc.spec.name, enc.weights_digest]
        tensors = [data[k] for k in sorted(data)] + ([val[k] for k in sorted(val)] if val is not None else [])
        return stage_dir(run_dir, "fit", settings, tensors)

    def _train(self, net: nn.Module, data: dict, val: dict | None, t0: float,
               run_dir: str | os.PathLike | None = None) -> None:
        """Fit ``module_class(net, data, config, val)`` with Lightning; keep the best validation epoch.

        ``run_dir``: checkpoint every epoch under it and resume from the last checkpoint (a
        finished training is read back from ``done.ckpt``); ``resumed_`` says which happened."""
        from .._lightning import make_trainer, quiet
        from .._resume import checkpoint_callback, last_ckpt, read_done, save_done

        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        module = self.module_class(net, data, cfg, val, loader_generator=g)
        ckpt_dir = None if run_dir is None else self._stage(run_dir, data, val)
        self.resumed_ = None
        train = any(p.requires_grad for p in net.parameters()) and cfg.max_epochs > 0
        if ckpt_dir is not None and read_done(module, ckpt_dir):
            self.resumed_, train = "finished", False
        resume = None if ckpt_dir is None or not train else last_ckpt(ckpt_dir)
        if resume is not None:
            self.resumed_ = "resumed"
        trainer = make_trainer(
            max_epochs=cfg.max_epochs, accelerator=self.accelerator, devices=self.devices, strategy=self.strategy,
            num_nodes=self.num_nodes, monitor="val_score" if val is not None else None, patience=cfg.patience, enable_progress_bar=False,
            epoch_bar=f"{type(self).__name__}: epochs",
            num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1,
            callbacks=[checkpoint_callback(ckpt_dir)] if ckpt_dir is not None else [],
            enable_checkpointing=ckpt_dir is not None,
        )
        loader = _train_loader(len(data["h"]), cfg.batch_size, trainer.num_nodes * trainer.num_devices, g)
        denormal = torch.set_flush_denormal(True)  # tiny adapter updates otherwise hit slow denormal floats on CPUs
        try:
            with quiet():  # (the frozen encoder stays in eval mode on purpose)
                if train:
                    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume, weights_only=True)
                    if ckpt_dir is not None:
                        save_done(trainer, ckpt_dir)
        finally:
            torch.set_flush_denormal(False) if denormal else None
        if module.best_state is not None:  # restore the best validation epoch
            net.load_state_dict(module.best_state, strict=False)
        self.history_ = module.history
        self.best_epoch_ = module.best_epoch + 1 if module.best_state is not None else len(self.history_)
        self.best_val_score_ = -module.best_score if val is not None and cfg.maximize else module.best_score
        self.net_ = net.eval()
        self.fit_seconds_ = time.time() - t0

    # -------------------------------------------------------------- inference
    def _check(self):
        if not hasattr(self, "net_"):
            raise StdistillError(f"{type(self).__name__} is not fitted; call fit() first (or {type(self).__name__}.load(path))")

    @torch.no_grad()
    def _outputs(self, adata: ad.AnnData, keys: tuple[str, ...] = ("features", "pred")) -> list[np.ndarray]:
        """The fitted net's outputs ``keys`` for every spot of ``adata`` (float32 arrays)."""
        self._check()
        H = self._activations(adata)
        self.net_.eval()
        got = {k: [] for k in keys}
        for i in range(0, len(H), 256):
            out = self.net_(as_input(H[i:i + 256, 0]))
            for k in keys:
                got[k].append(out[k].float())
        return [torch.cat(got[k]).numpy().astype(np.float32) for k in keys]

    def _features_out(self, adata: ad.AnnData) -> np.ndarray:
        """(n_spots, dim) float32 adapted-encoder features (a recipe's ``transform`` writes them)."""
        (f,) = self._outputs(adata, ("features",))
        return f

    def _predict_frame(self, adata: ad.AnnData) -> pd.DataFrame:
        """(n_spots x targets) regression-head predictions on the training targets' scale."""
        (p,) = self._outputs(adata, ("pred",))
        return pd.DataFrame(p * self.y_std_ + self.y_mean_, index=adata.obs_names, columns=getattr(self, f"{self.targets_key}_"))

    @property
    def trainable_share(self) -> float:
        """Adapter parameters / encoder parameters (heads not counted)."""
        self._check()
        return float(self.adapter_info_["share"])

    def report(self) -> dict:
        self._check()
        heads = sum(p.numel() for n, p in self.net_.named_parameters() if n.startswith(self.heads))
        return {**{k: v for k, v in self.adapter_info_.items() if k != "targets"}, "n_targets": len(self.adapter_info_["targets"]),
                "n_head_params": heads, "best_epoch": self.best_epoch_, "fit_seconds": round(self.fit_seconds_, 1)}

    # -------------------------------------------------------------- persistence
    def bundle_record(self) -> dict:
        """The ``"bundle"`` entry of the saved config (see :mod:`stdistill.bundle`)."""
        from ..bundle import bundle_record

        self._check()
        enc = self._frozen_encoder()
        targets = getattr(self, f"{self.targets_key}_")
        return bundle_record(
            type(self).__name__.lower(), encoder=enc.spec.name, weights_digest=enc.weights_digest,
            size_um=self.config.size_um, px=self.config.px, precision="fp32", feature_norm="heads (training mean/sd)",
            licence=enc.spec.licence, outputs={self.targets_key: list(targets)},
            training={"best_epoch": self.best_epoch_, "fit_seconds": round(self.fit_seconds_, 1),
                      "trainable_share": self.adapter_info_.get("share"),
                      **getattr(self, "training_summary_", {}), **selection_record(getattr(self, "selection_", None))},
        )

    def _state(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu().contiguous() for k, v in self.net_.state_dict().items()
                 if trainable_key(k, self.heads) or k in self.buffers}
        state["y_mean"] = torch.from_numpy(self.y_mean_.astype(np.float32))
        state["y_std"] = torch.from_numpy(self.y_std_.astype(np.float32))
        return state

    def _bundle_parts(self) -> tuple[dict, dict, dict]:
        """(config, tensors, record) of the bundle: adapter + heads + target scaling, settings, stain reference."""
        self._check()
        cfg = {"config": self.config.record(), self.targets_key: list(getattr(self, f"{self.targets_key}_")),
               "adapter_info": self.adapter_info_, **self._stain_record()}
        return cfg, self._state(), self.bundle_record()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle folder ``path`` (``config.json`` + ``model.safetensors``; see :mod:`stdistill.bundle`).
        After a DDP fit only global rank 0 writes (the other processes return the path)."""
        from .._lightning import is_global_zero
        from ..bundle import save_bundle

        self._check()
        return save_bundle(self, path) if is_global_zero() else Path(path)

    def _stain_record(self) -> dict:
        """``{"stain": method, reference, reference_section}`` saved with a stain-normalising model
        (so a reloaded one normalises new slides onto the training reference); empty otherwise."""
        state = getattr(self, "stain_", None)
        return {"stain": state} if state is not None else {}

    def _net_from_state(self, tail: Tail, state: dict[str, torch.Tensor]) -> nn.Module:
        """The recipe's net around ``tail``, shaped to fit a saved state (a recipe hook)."""
        raise NotImplementedError

    @classmethod
    def _from_bundle(cls, meta, state, record, path, *, encoder=None, **kw):
        """Rebuild a saved model. ``encoder``: a name or Encoder when the saved one is not in the
        registry (refused when its weights digest differs from the recorded one); ``kw``:
        constructor arguments (``cache_dir``, ``device``, ...)."""
        meta = {**meta, "encoder": record["encoder"]["name"], "bundle": record}
        self = cls(encoder or meta["encoder"], cls.config_class(**meta["config"]), **kw)
        want = meta.get("bundle", {}).get("encoder", {}).get("weights_digest")
        have = self._frozen_encoder().weights_digest
        if want and have and want != have:
            raise StdistillError(f"the encoder given has other weights ({have[:12]}) than the model was trained on "
                                 f"({meta['encoder']}, {want[:12]})", path)
        setattr(self, f"{cls.targets_key}_", list(meta[cls.targets_key]))
        self.stain_ = meta.get("stain")
        if self.config.stain_norm is not None and not self.stain_:
            raise StdistillError(f"saved with stain_norm={self.config.stain_norm!r} but without its stain reference", path)
        net = self._net_from_state(self._adapted_tail(), state)
        self.y_mean_, self.y_std_ = state["y_mean"].numpy(), state["y_std"].numpy()
        del state["y_mean"], state["y_std"]
        check_state(net.state_dict(), state, path, cls.__name__, strict=False)
        missing, unexpected = net.load_state_dict(state, strict=False)
        bad = [k for k in missing if trainable_key(k, self.heads)]
        if bad or unexpected:
            raise StdistillError(f"saved weights do not fit the encoder ({(bad + unexpected)[:3]})", path)
        self.net_ = net.eval()
        training = meta.get("bundle", {}).get("training", {})
        self.best_epoch_, self.fit_seconds_, self.history_ = training.get("best_epoch", -1), training.get("fit_seconds", 0.0), []
        self.selection_ = Selection.from_dict(training["selection"]) if training.get("selection") else None
        return self
