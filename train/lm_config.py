"""Configuration of LM training (`python -m train.lm preset=... key=value ...`)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from chameleon_jax.config import MODEL_PRESETS, MeshConfig, ModelConfig
from chameleon_jax.configlib import param
from chameleon_jax.lm_data import LMDataConfig
from train.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class LMTrainConfig:
    """One language-model training run."""

    model: ModelConfig = param(ModelConfig(), "the transformer")
    mesh: MeshConfig = param(MeshConfig(), "device mesh and logical-axis sharding rules")
    data: LMDataConfig = param(LMDataConfig(), "documents, vocabulary, image codes and packing")
    optim: OptimConfig = param(OptimConfig(), "optimizer and learning-rate schedule")
    steps: int = param(200, "optimizer steps to train for (total, including resumed ones)")
    batch_size: int = param(8, "global batch in packed rows of data.sequence.seq_len tokens")
    log_interval: int = param(10, "steps between metric log lines")
    eval_interval: int = param(100, "steps between validation-loss evaluations (and one at the end); 0 = end only")
    checkpoint_interval: int = param(100, "steps between checkpoints (and one at the end); 0 = end only")
    keep_checkpoints: int = param(3, "most recent checkpoints kept on disk")
    async_checkpoint: bool = param(True, "write checkpoints in the background while training continues")
    seed: int = param(0, "parameter initialisation and dropout seed")
    run_dir: str = param("runs/lm", "output folder: config, checkpoints, metrics, curves, exported model")
    vq_dir: str = param("", "VQ tokenizer run folder (train.vqvae output); empty = colour-grid stand-in (smoke tests)")
    overwrite: bool = param(False, "delete an existing run_dir first instead of reusing or resuming it")
    auto_vocab_size: bool = param(True, "set model.vocab_size to the vocabulary's size rounded up to vocab_multiple")
    vocab_multiple: int = param(128, "rounding of the embedding rows with auto_vocab_size")
    peak_flops: float = param(0.0, "peak FLOP/s of one device for MFU; 0 = measure a dense f32 matmul once at start")
    compilation_cache_dir: str = param(
        "", "persistent XLA compilation cache folder (faster restarts); empty = off; must be set before the first compile"
    )
    progress: bool = param(True, "show a tqdm progress bar")
    distributed: Literal["auto", "on", "off"] = param(
        "auto",
        "jax.distributed.initialize(): on = always (cluster auto-detection), auto = when num_processes > 1, "
        "a coordinator_address or $JAX_COORDINATOR_ADDRESS is set",
    )
    coordinator_address: str = param("", "host:port of process 0 for multi-process runs")
    num_processes: int = param(0, "number of processes of a multi-process run; 0 = auto-detect")
    process_id: int = param(-1, "this process's index in a multi-process run; -1 = auto-detect")


def _with_seq(cfg: LMTrainConfig, seq_len: int, **data) -> LMTrainConfig:
    seq = dataclasses.replace(cfg.data.sequence, seq_len=seq_len)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sequence=seq, **data))


def tiny() -> LMTrainConfig:
    """Seconds on a laptop CPU: the tiny model, short rows, a few dozen steps."""
    cfg = LMTrainConfig(
        model=dataclasses.replace(MODEL_PRESETS["tiny"](), image_positions=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        steps=40,
        batch_size=8,
        log_interval=5,
        eval_interval=20,
        checkpoint_interval=20,
        run_dir="runs/lm-tiny",
    )
    return _with_seq(cfg, 256, vocab_corpus_docs=1000, interleaved_docs=64, eval_batches=2, grid_cells=4,
                     shapes_backend="generate", train_examples=512, eval_examples=64)


def small() -> LMTrainConfig:
    """The `small` model on Shapes: minutes to an hour on a CPU."""
    # Learned image-code positions (chameleon_jax.image_positions): each code knows its cell.
    cfg = LMTrainConfig(
        model=dataclasses.replace(MODEL_PRESETS["small"](), image_positions=-1),
        optim=OptimConfig(lr=1e-3, warmup_steps=100),
        steps=2000,
        batch_size=16,
        log_interval=10,
        eval_interval=250,
        checkpoint_interval=250,
        run_dir="runs/lm-small",
    )
    return _with_seq(cfg, 384)


def demo() -> LMTrainConfig:
    """The end-to-end demo: a 192-wide `small` trained on Shapes after the VQ stage (pass vq_dir=...)."""
    cfg = small()
    # Sized to fit the demo's 30 minutes on 2 CPU cores as nearly as its goals allow. The transformer
    # is `small` narrowed to 192 (6 heads of 32, MLP 576; 2.7M parameters): on equal rows a step costs
    # two thirds of `small`'s, so it sees 2000 batches in the time `small` sees 1350, and answers
    # questions better (VQA 0.937-0.957 against 0.920-0.930). Interleaved documents are
    # long and not among the headline goals, so they get a quarter of the weight; one-object
    # pictures are easy, so t2i and VQA documents show two objects 85% of the time (captions keep
    # 60%, or the captioner learns to name a second object that is not there); 100000 training
    # pictures keep the model from learning the training pictures' codes by heart. Image codes share
    # learned rows through their FSQ digits (chameleon_jax.code_digits), and the output head scores
    # an image code by its digits alone (image_code_own_logits=False), so the distribution over
    # codes is one per digit: held-out (colour, shape) pairs are drawn right far more often.
    # Text-to-image documents get twice the weight of VQA's and caption documents 1.5 times: more
    # held-out pairs drawn right, and the captions that the digits-only head costs won back. A VQA
    # document asks where an object is three times as often as each other question about it, since
    # position is what the model answers worst, and the matrices take no weight decay (a lower eval
    # loss). Together they answer more questions right on both data seeds; how many held-out pairs
    # are drawn right depends on the seed more than on either.
    # Rows are 192 tokens (32 of them: the same 6144 slots a step as 16 rows of 384). A document is
    # at most 83 tokens and attends only to itself, so shorter rows change nothing the model sees but
    # skip attention between documents (a step 14% cheaper); blocks of 512 documents packed best-fit
    # pad 5% of the slots, as greedy rows of 384 did (greedy rows of 192 pad 9%). With the demo's two
    # CPU devices a step takes about 0.65 s in float32. The projections multiply in bf16 with float32
    # accumulation (model.matmul_dtype; norms, residuals, attention scores and the loss stay float32):
    # on a CPU with AMX those matmuls run 4-5 times faster, and a step takes about 0.46 s; with XLA's
    # scratch memory in huge pages (chameleon_jax.host_malloc, which the commands turn on) about 0.43 s.
    # docs/experiments.md has the runs.
    model = dataclasses.replace(cfg.model, hidden_dim=192, num_heads=6, num_kv_heads=6, ffn_dim=576,
                                image_code_digits=(-1,), image_code_own_logits=False, matmul_dtype="bfloat16")
    return dataclasses.replace(
        cfg, steps=2000, batch_size=32, run_dir="runs/demo/lm", eval_interval=1000, checkpoint_interval=500,
        model=model, optim=dataclasses.replace(cfg.optim, lr=3e-3, warmup_steps=50, weight_decay=0.0),
        data=dataclasses.replace(cfg.data, interleaved_weight=0.25, two_object_share=0.85, t2i_weight=2.0,
                                 caption_weight=1.5, position_question_weight=3.0,
                                 train_examples=100_000, interleaved_docs=10_000,
                                 sequence=dataclasses.replace(cfg.data.sequence, seq_len=192, pack_docs=512)),
    )


PRESETS = {"tiny": tiny, "small": small, "demo": demo}
