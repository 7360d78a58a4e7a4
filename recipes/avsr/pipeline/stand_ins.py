"""Small stand-ins for the pretrained checkpoints of a real run (Whisper, AV-HuBERT and a Llama), for the embedded
corpus: built here and pretrained on its training split only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..data.loader import LoaderConfig, make_loader
from ..data.lrs3 import Utterance
from ..data.synthetic import GRAMMAR
from .lip_encoder import LipEncoderConfig, LipEncoderModel
from .sequences import MODALITY_TOKENS, PROMPTS

STAND_INS = ("llm", "audio_encoder", "video_encoder")


def build_word_tokenizer(words: Iterable[str]):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` + the prompts' words + special tokens, built locally."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *MODALITY_TOKENS]
    prompt_words = {w for p in PROMPTS.values() for w in p.lower().replace(".", " .").split()}
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words) | prompt_words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=MODALITY_TOKENS,
    )


def tiny_audio_encoder(seconds: int = 4, d_model: int = 128, layers: int = 2, heads: int = 4):
    """A random-init Whisper encoder taking ``seconds`` of audio (Whisper's fixed input length) and its extractor."""
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    mel_frames = int(seconds * 100)  # hop 160 at 16 kHz
    config = WhisperConfig(
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=mel_frames // 2,
        init_std=0.08,  # keeps the random features' scale near the inputs' (Whisper's 0.02 shrinks them)
    )
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=seconds)
    return WhisperEncoder(config), extractor


def tiny_video_encoder(hidden_size: int = 128, layers: int = 1) -> LipEncoderModel:
    """A random-init :class:`LipEncoderModel`."""
    return LipEncoderModel(
        LipEncoderConfig(stem_channels=16, channels=[32, 64], hidden_size=hidden_size, num_layers=layers)
    )


def tiny_llm(tokenizer, hidden_size: int = 256, layers: int = 4, heads: int = 4):
    """A random-init Llama-architecture causal LM sized for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 8 / 3) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def stand_in_paths(output_dir: str | Path) -> dict[str, Path]:
    """Where a run keeps its stand-ins: ``output_dir/base_models/{llm,audio_encoder,video_encoder}``."""
    base = Path(output_dir) / "base_models"
    return {name: base / name for name in STAND_INS}


def build_stand_ins(
    output_dir: str | Path,
    train_utts: list[Utterance],
    loader_config: LoaderConfig,
    encoder_steps: int,
    text_steps: int,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Save the embedded encoders and LLM under ``output_dir/base_models`` (kept when already there); returns their
    paths (:func:`stand_in_paths`).

    They stand in for the pretrained checkpoints of a real run, and are pretrained here on the training split only
    (the test sentences are never seen): the small Whisper and lip encoders with word-level CTC (Whisper and
    AV-HuBERT carry linguistic features too), the small Llama as a language model on the transcripts. The AVSR runs
    then keep all three frozen and train only the projectors and LoRA, as Llama-AVSR does.
    """
    from transformers import set_seed

    paths = stand_in_paths(output_dir)
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    set_seed(seed)
    texts = [u.text for u in train_utts]
    words = sorted({w for t in texts for w in t.split()} | {w for ws in GRAMMAR.values() for w in ws})
    tokenizer = build_word_tokenizer(words)
    audio_encoder, extractor = tiny_audio_encoder(seconds=3)
    video_encoder = tiny_video_encoder()
    log(f"pretraining the embedded encoders with CTC on {len(train_utts)} utterances ({encoder_steps} steps)")
    losses = pretrain_encoders_ctc(
        audio_encoder, video_encoder, extractor, tokenizer, train_utts, loader_config, encoder_steps, seed
    )
    log(
        "embedded encoders: CTC loss " + ", ".join(f"{k} {v[0]:.2f} -> {_tail_mean(v):.2f}" for k, v in losses.items())
    )
    audio_encoder.save_pretrained(paths["audio_encoder"])
    extractor.save_pretrained(paths["audio_encoder"])
    video_encoder.save_pretrained(paths["video_encoder"])
    llm = tiny_llm(tokenizer)
    log(f"pretraining the embedded LLM on {len(texts)} transcripts ({text_steps} steps)")
    losses = pretrain_text_llm(llm, tokenizer, texts, text_steps, seed=seed)
    log(f"embedded LLM: text loss {losses[0]:.2f} -> {_tail_mean(losses):.2f}")
    llm.save_pretrained(paths["llm"])
    tokenizer.save_pretrained(paths["llm"])
    return paths


def _tail_mean(values: list[float], n: int = 20) -> float:
    return sum(values[-n:]) / max(1, len(values[-n:]))


def pretrain_encoders_ctc(
    audio_encoder,
    video_encoder,
    extractor,
    tokenizer,
    utts: list[Utterance],
    loader_config: LoaderConfig,
    steps: int,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Word-level CTC training of both embedded encoders (a linear head each, discarded afterwards)."""
    from tqdm.auto import tqdm

    heads = torch.nn.ModuleDict(
        {
            "audio": torch.nn.Linear(audio_encoder.config.d_model, len(tokenizer)),
            "video": torch.nn.Linear(video_encoder.config.hidden_size, len(tokenizer)),
        }
    )
    encoders = torch.nn.ModuleDict({"audio": audio_encoder, "video": video_encoder})
    params = list(encoders.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=max(steps, 1), pct_start=0.1)
    ctc = torch.nn.CTCLoss(blank=tokenizer.pad_token_id, zero_infinity=True)
    loader = make_loader(loader_config, utts, "avsr", extractor, tokenizer, train=True, seed=seed)
    encoders.train()
    losses: dict[str, list[float]] = {"audio": [], "video": []}
    bar = tqdm(total=steps, desc="encoder pretraining (CTC)", leave=False)
    # the steps are counted here, not by the bar: a disabled bar (TQDM_DISABLE=1) counts nothing, and training ran
    # on past its schedule
    step, epoch = 0, 0
    while step < steps:
        loader.batch_sampler.set_epoch(epoch)
        epoch += 1
        usable, skipped = 0, {}
        for batch in loader:
            if step >= steps:
                break
            skipped.update(batch["skipped"])
            if not batch["uids"]:
                continue
            usable += 1
            targets = batch["transcript_ids"]
            flat = torch.tensor([i for t in targets for i in t])
            target_lengths = torch.tensor([len(t) for t in targets])
            lengths = {"audio": batch["audio_lengths"], "video": batch["video_lengths"]}
            feats = {
                "audio": audio_encoder(batch["audio_features"]).last_hidden_state[:, : int(lengths["audio"].max())],
                "video": video_encoder(batch["video"], lengths["video"]).last_hidden_state,
            }
            total = 0.0
            for name, hidden in feats.items():
                log_probs = heads[name](hidden).log_softmax(-1).transpose(0, 1)  # T, B, V
                loss = ctc(log_probs, flat, lengths[name], target_lengths)
                losses[name].append(loss.item())
                total = total + loss
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            bar.update(1)
        if not usable and step < steps:  # every epoch would be the same: stop instead of spinning
            raise RuntimeError(
                f"encoder pretraining: no training file could be read ({len(skipped)} skipped, e.g. "
                f"{list(skipped.values())[:3]})"
            )
    bar.close()
    encoders.eval()
    return losses


def pretraining_line(rng, texts: list[str]) -> str:
    """One line of the embedded LLM's text pretraining.

    Half the lines are plain language modelling (``[prompt] sentence``); the other half teach in-context copying,
    the skill a pretrained LLM brings to Llama-AVSR: the sentence spread out (every word repeated 1-3 times, with
    runs of "." between words, like words spread over frames with pauses), then a prompt, then the sentence. No
    modality delimiter is ever seen.
    """
    sentence = rng.choice(texts)
    prompt = rng.choice(list(PROMPTS.values()))
    if rng.random() < 0.5:
        return f"{prompt} {sentence}" if rng.random() < 0.5 else sentence
    spread = [" ".join(["."] * rng.randint(0, 3) + [w] * rng.randint(1, 3)) for w in sentence.split()]
    return f"{' '.join(spread)} {prompt} {sentence}"


def pretrain_text_llm(
    llm, tokenizer, texts: list[str], steps: int, seed: int = 0, batch_size: int = 32
) -> list[float]:
    """Causal-LM training of the embedded LLM on :func:`pretraining_line` text; returns the losses."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    llm.train()
    losses = []
    for _ in tqdm(range(steps), desc="text pretraining", leave=False):
        lines = [pretraining_line(rng, texts) for _ in range(batch_size)]
        enc = tokenizer(
            [f"{tokenizer.bos_token} {t} {tokenizer.eos_token}" for t in lines],
            padding=True,
            return_tensors="pt",
            add_special_tokens=False,
        )
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = llm(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    llm.eval()
    return losses
