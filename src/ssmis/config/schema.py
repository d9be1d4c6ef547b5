"""Typed configuration of a run. Every field has a default and a description; unknown keys are errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PhantomConfig(Section):
    patients: int = Field(24, ge=4, description="Number of synthetic patients (one volume each).")
    slices: int = Field(8, ge=1, description="Slices per phantom volume.")
    size: int = Field(64, ge=16, description="In-plane size of phantom images (pixels).")
    seed: int = Field(0, description="Seed of the phantom generator (the data are a function of it).")


class DataConfig(Section):
    layout: str = Field("auto", description="Data layout: auto, phantom, sphere, head, ssl4mis_h5, la_h5, hc18, nnunet, folders.")
    root: str | None = Field(None, description="Dataset root folder (not needed for the phantom).")
    num_classes: int | None = Field(None, ge=2, description="Number of classes incl. background; default from the dataset.")
    patch_size: list[int] = Field([128, 128], description="[H, W]: 2D training, slices resized to it (slice-wise "
                                  "inference on volumes); [D, H, W]: 3D training on patches cropped from volumes "
                                  "(sliding-window inference).")
    fg_fraction: float = Field(0.33, ge=0, le=1, description="3D: share of labelled patches centred on a foreground voxel.")
    rot_plane: list[int] = Field([1, 2], min_length=2, max_length=2, description="3D: the two spatial axes (array "
                                 "order) of the rot90 + flip augmentation; [1, 2] = H, W of D×H×W volumes; LA's x, y, z "
                                 "arrays: [0, 1], as UA-MT.")
    restack_volumes: bool = Field(False, description="ssl4mis_h5: rebuild training volumes from their slices "
                                  "(stack <volume>_slice_K in K order) for 3D training.")
    slice_axis: int = Field(0, ge=0, le=2, description="Axis of 3D volumes along which 2D slices are taken (array order D,H,W).")
    image_order: int = Field(0, ge=0, le=3, description="Spline order when resizing images to the patch (ACDC protocol: 0).")
    augment_at: Literal["source", "patch"] = Field("source", description="2D: where the geometric augmentation "
                                                   "acts: `source` = on the stored slice at its own size, then the "
                                                   "zoom to the patch, in one resample per batch on the training "
                                                   "device (SSL4MIS RandomGenerator's order); `patch` = slices resized "
                                                   "to the patch at load, augmented there (ACDC-lite's benchmark "
                                                   "generation 1; moves foreground pixels of rotated non-square slices).")
    pad_square: bool = Field(False, description="2D: zero-pad each slice symmetrically to a square before resizing it "
                             "to the patch, so the aspect ratio is kept (HC18-lite); predictions are cropped back.")
    mask_values: dict[int, int] | None = Field(None, description="Image-folder layout: mask pixel value -> class index.")
    channels: int | None = Field(None, ge=1, description="Image channels; default from the dataset.")
    spacing: list[float] | None = Field(None, description="Voxel spacing in mm (array axis order; one value = isotropic) "
                                        "for layouts whose files carry none (ssl4mis_h5, la_h5, folders; LA: 0.625): "
                                        "HD95/ASD are then also reported in mm. Recorded in the run and its reports.")
    phantom: PhantomConfig = Field(default_factory=PhantomConfig, description="Settings of the built-in phantom.")

    @field_validator("rot_plane")
    @classmethod
    def _two_axes(cls, v):
        if len(set(v)) != 2 or any(not 0 <= a <= 2 for a in v):
            raise ValueError("rot_plane needs two different spatial axes among 0, 1, 2")
        return v

    @field_validator("spacing", mode="before")
    @classmethod
    def _one_spacing_is_a_list(cls, v):
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("spacing")
    @classmethod
    def _positive_spacing(cls, v):
        if v is not None and (not v or any(not 0 < s < float("inf") for s in v)):
            raise ValueError("spacing needs one or more positive values in mm")
        return v


class SplitConfig(Section):
    protocol: bool = Field(True, description="Use the dataset's published split where it has one (ACDC: first N slices).")
    labeled: float = Field(7, gt=0, description="Labelled patients (a count >= 1, or a fraction < 1). ACDC protocol: slices (68/136/256) or patients (3/7/14).")
    val: float = Field(0.1, ge=0, description="Validation patients: a count >= 1 or a fraction < 1 (ignored where the dataset has a val list).")
    test: float = Field(0.2, ge=0, description="Test patients: a count >= 1 or a fraction < 1 (ignored where the dataset has a test list).")
    seed: int = Field(0, description="Seed of the patient permutation (fixed across methods for a fair comparison).")
    file: str | None = Field(None, description="An explicit splits.json (lists of case ids) instead of drawing one.")
    labeled_scans: list[str] | None = Field(None, description="Label exactly these training scans (volume ids, e.g. "
                                            "ACDC patient100_frame01: all its slices in a slice layout), every other "
                                            "training case unlabelled, val/test as the split makes them; replaces "
                                            "split.labeled (SPCL's labelled-scan protocol).")


class ModelConfig(Section):
    name: str = Field("unet2d", description="Model registry name.")
    widths: list[int] = Field([16, 32, 64, 128, 256], description="Encoder widths, shallow to deep.")
    dropout: list[float] = Field([0.05, 0.1, 0.2, 0.3, 0.5], description="Encoder dropout per stage.")


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimiser.")
    lr: float = Field(0.01, gt=0, description="Base learning rate.")
    momentum: float = Field(0.9, ge=0, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")


class SchedConfig(Section):
    name: Literal["poly", "step", "constant"] = Field("poly", description="lr schedule: poly (1-t/T)^power, step, constant.")
    power: float = Field(0.9, description="Exponent of the poly schedule.")
    step_fraction: float = Field(2500 / 6000, gt=0, le=1, description="Step schedule: decay every this fraction of the run.")
    gamma: float = Field(0.1, gt=0, description="Step schedule: decay factor.")


class TrainConfig(Section):
    iterations: int = Field(2000, ge=1, description="Optimiser steps of the whole run, all stages included.")
    labeled_bs: int = Field(4, ge=1, description="Labelled images per step.")
    unlabeled_bs: int = Field(4, ge=0, description="Unlabelled images per step.")
    augment: Literal["auto", "ssl4mis", "bcp", "none"] = Field(
        "auto", description="Geometric augmentation (methods.md, Augmentation); auto = the method's own "
                            "(SSL4MIS RandomGenerator, or the BCP variant for BCP, ABD, FixMatch, UniMatch).")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field("auto", description="Mixed precision; auto = bf16 only where the hardware computes it natively.")
    channels_last: Literal["auto", "on", "off"] = Field("auto", description="Memory format; auto = channels_last for 2D on CPU and CUDA, contiguous in 3D.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device; auto = cuda when available.")
    prefetch: Literal["auto", "on", "off"] = Field("auto", description="Make each batch one step ahead in a "
                                                   "thread (same batches, exact resume); auto = on when training on "
                                                   "a GPU, where the CPU work (3D crops) then overlaps the step.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: the cores divided among the processes on this machine (torchrun, bench --jobs), at most 4 on CUDA.")
    cpu_allocator: Literal["heap", "system"] = Field(
        "heap", description="Where large CPU tensors come from (glibc): heap = reused from step to step (a 3D C3S3 "
                            "step 2.2x faster than with a fresh memory mapping per tensor; the process keeps its peak "
                            "memory); system = glibc's defaults. Changes no computed value (ssmis.engine.allocator).")
    deterministic: bool = Field(False, description="Deterministic algorithms (needed for bitwise-exact resume).")
    eval_every: int = Field(200, ge=0, description="Validate every N steps (0 = only at the end).")
    ckpt_every: int = Field(200, ge=1, description="Write last.pt every N steps.")
    log_every: int = Field(10, ge=1, description="Write training metrics every N steps.")
    max_nonfinite: int = Field(5, ge=1, description="Stop after this many non-finite losses in a row.")
    intensity: float = Field(0.0, ge=0, lt=1, description="Intensity jitter x(1+a)+b, a,b ~ U(-v, v); 0 = off.")
    clip_grad_norm: float | None = Field(None, gt=0, description="Clip gradients to this norm (off by default).")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (needs the tensorboard extra).")
    val_max_cases: int | None = Field(None, ge=1, description="Validate on at most this many val cases (speed).")
    val_at: Literal["original", "patch"] = Field("original", description="2D validation Dice at the case's own size "
                                                 "(ACDC-lite) or at the patch size, against the label padded and "
                                                 "resized like the training masks (HC18-lite: at 256x256).")

    @field_validator("amp", "channels_last", "prefetch", mode="before")
    @classmethod
    def _yaml_booleans(cls, v):
        # YAML reads a bare off/on as a boolean
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class EvalConfig(Section):
    split: Literal["val", "test"] = Field("test", description="Split scored by `ssmis eval --run`.")
    hd95: Literal["pooled", "max_directed"] = Field("pooled", description="HD95 convention (pooled = medpy, the literature's).")
    empty_both: Literal["skip", "perfect"] = Field("skip", description="Both masks empty: skip (NaN, excluded) or score perfect.")
    empty_one: Literal["worst", "nan"] = Field("worst", description="Exactly one mask empty: worst (Dice 0, distances = diagonal) or nan.")
    batch_size: int = Field(16, ge=1, description="Slices (2D) or windows (3D) per forward at inference.")
    overlap: float = Field(0.5, ge=0, lt=1, description="3D sliding-window overlap between neighbouring windows.")
    stride: list[int] | None = Field(None, description="3D sliding-window step in voxels per axis, instead of "
                                     "eval.overlap (LA protocol: [18, 18, 4]).")
    blend: Literal["gaussian", "constant"] = Field("gaussian", description="3D sliding-window weights: Gaussian, or "
                                                    "constant = plain averaging of the softmax (UA-MT/BCP LA test).")
    largest_component: bool = Field(False, description="Test and predict: keep only the largest connected component "
                                     "of each class in every case (BCP's LA test, --nms 1); validation is unaffected.")
    upsample: Literal["labels", "logits"] = Field("labels", description="2D: how predictions return to the input size: "
                                                  "nearest-neighbour resize of the label map (ACDC protocol) or bilinear "
                                                  "resize of the logits, then argmax (HC18-lite).")


    @field_validator("stride", mode="before")
    @classmethod
    def _one_stride_is_a_list(cls, v):
        return [v] if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stride")
    @classmethod
    def _positive_stride(cls, v):
        if v is not None and (not v or any(s < 1 for s in v)):
            raise ValueError("stride needs positive voxel counts, one per axis (or one for all)")
        return v


class DistConfig(Section):
    sync_bn: bool = Field(False, description="Under torchrun: convert BatchNorm to SyncBatchNorm.")


class MetaLabelConfig(Section):
    name: str = Field(..., description="Meta-label: partition (slice position in P groups), scan, patient, phase "
                      "(cardiac cycle, ACDC), self (each slice its own class) or item.<key> (an integer the adapter "
                      "provides per case).")
    weight: float = Field(1.0, ge=0, description="λ_k of the weighted average Σ λ_k L_k / Σ λ_k.")
    gamma0: float = Field(5.0, gt=0, description="Self-paced threshold γ at the first epoch (loss units).")
    gamma1: float = Field(60.0, gt=0, description="γ the schedule heads for at epoch E (never reached: the last "
                          "epoch runs at γ(E − 1), as the reference).")

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        from ssmis.data.meta_labels import check_meta_label_name

        return check_meta_label_name(v)


class PretrainConfig(Section):
    """`ssmis pretrain`: SPCL's self-paced contrastive pre-training of the encoder (methods.md "SPCL")."""

    meta_labels: list[MetaLabelConfig] = Field(
        default_factory=lambda: [MetaLabelConfig(name="partition")], min_length=1,
        description="Meta-labels, one projection head and one self-paced SupCon loss each, averaged with their weights.")
    partitions: int = Field(3, ge=1, description="P: groups of the slice-position partition (ACDC 3, prostate 8).")
    partition_rule: Literal["auto", "acdc", "floor"] = Field(
        "auto", description="acdc: i <= L//3-1 -> 0, i <= 2(L//3) -> 1, else 2 (P = 3); floor: i // (L//P + 1); "
                            "auto = acdc at P = 3, else floor.")
    sampler: Literal["auto", "partition", "random"] = Field(
        "auto", description="partition: m scans x one slice per partition (ACDC); random: a plain random sampler "
                            "of batch_size slices; auto = partition when slices carry positions, else random.")
    scans_per_batch: int = Field(10, ge=1, description="m, scans per batch of the partition sampler (ACDC 10).")
    batch_size: int | None = Field(None, ge=2, description="Slices per batch of the random sampler; default m·P.")
    tau: float = Field(0.07, gt=0, description="Temperature of the contrastive loss.")
    weighting: Literal["hard", "soft", "none"] = Field(
        "soft", description="Self-paced pair weights: hard 1[l <= γ], soft max(0, 1 - l/γ), none = plain SupCon.")
    schedule: Literal["inversesquare", "linear", "square"] = Field(
        "inversesquare", description="γ(e) = γ0 + (γ1 - γ0)·f(e/E): f = sqrt, identity or square.")
    epochs: int = Field(80, ge=1, description="E: the run's steps are cut into E epochs; γ and the warm-up advance "
                        "per epoch (the reference: 80 epochs x 200 iterations).")
    normalize_weights: bool = Field(False, description="Divide each loss by its mean positive-pair weight (the "
                                    "reference's later `correct_grad` option).")
    projector_dim: int = Field(256, ge=1, description="Width of the projection head (pool -> Linear -> LeakyReLU -> "
                               "Linear -> L2 norm).")
    optimizer: Literal["radam", "adam", "sgd"] = Field("radam", description="Optimiser of the pre-training (reference RAdam).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (reference 5e-7 x 400).")
    weight_decay: float = Field(1e-5, ge=0, description="Weight decay (reference 1e-5).")
    warmup_epochs: float = Field(10, ge=0, description="Linear warm-up from lr/400 to lr over these epochs, then "
                                 "cosine to min_lr (reference 10 of 80).")
    min_lr: float = Field(1e-7, ge=0, description="Final learning rate of the cosine decay.")
    augment: Literal["ssl4mis", "bcp", "none"] = Field(
        "ssl4mis", description="Geometric augmentation of each view (data.augment_at applies).")
    intensity: float = Field(0.3, ge=0, lt=1, description="Intensity jitter x(1+a)+b of each view, a, b ~ U(-v, v) "
                             "(stands in for the reference's brightness/contrast jitter in [0.5, 1.5]).")


class InitConfig(Section):
    encoder: str | None = Field(None, description="Initialise the encoder of every network of the run that is the "
                                "run's model (student, EMA teachers, both networks of CPS) from a pre-training run "
                                "directory (`ssmis pretrain --out DIR`: its checkpoints/last.pt) or a checkpoint "
                                "file; the decoder keeps its own initialisation. None = random initialisation.")


class RunConfig(Section):
    name: str | None = Field(None, description="Run name (default: <layout>-<method>-l<labeled>-s<seed>).")
    seed: int = Field(0, description="Training seed (initialisation, sampling, augmentation).")
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "supervised"},
                                   description="Method section; validated by the method's own Config (by name).")
    plugins: list[dict[str, Any]] = Field(default_factory=list,
                                          description="Plug-ins in the host method's slots, applied in this order; "
                                          "each validated by the plug-in's own Config (by name).")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sched: SchedConfig = Field(default_factory=SchedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    init: InitConfig = Field(default_factory=InitConfig, description="Initialisation from a pre-training (init.encoder).")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="`ssmis pretrain` only: SPCL's "
                                     "contrastive pre-training of the encoder.")
