#!/usr/bin/env python3
"""Build small random-weight Qwen3-TTS checkpoints in the exact Hugging Face hub layout.

The real weights (about 2.4 GB) come from the hub, which tests and CI cannot reach. These checkpoints keep the real
architecture, the real codec geometry (vocab 3072, 16 code groups of 2048, 1920 samples per frame at 24 kHz), the real
speakers, languages and dialects, and load with `Qwen3TTSModel.from_pretrained(dir)` fully offline. Only widths and
depths are shrunk, so a checkpoint is a few MB and generates audio in a fraction of a second on a CPU. Random weights
make noise, not speech; everything else about the model is real.

    python tools/build_tiny_checkpoints.py [OUT_DIR]              # default: build/checkpoints
    python tools/build_tiny_checkpoints.py --full-size [OUT_DIR]  # the real 0.6B geometry, random (benchmarks)

Builds (seeded, byte-for-byte deterministic):
    tiny-0.6B-CustomVoice   the 9 speakers; instructions ignored by qwen_tts (tts_model_size 0b6), like the real 0.6B
    tiny-1.7B-CustomVoice   the same speakers, tts_model_size 1b7: the configuration that accepts instructions
    tiny-0.6B-Base          voice cloning: empty speaker table, a speaker encoder, a speech-tokenizer encoder
    tiny-1.7B-VoiceDesign   voices designed from an instruction
    random-0.6B-CustomVoice, random-0.6B-Base (--full-size only) the real 0.6B geometry, random weights: real costs

Usage in the server: MODEL_ID=build/checkpoints/tiny-0.6B-CustomVoice python server.py
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 1234
HERE = Path(__file__).resolve().parent
REAL_CONFIGS = {
    # The real 0.6B CustomVoice configuration (see README: values reconstructed from public sources). Speakers,
    # languages, dialects and codec ids below are the real ones; widths and depths are replaced by TINY_* values.
    "speakers": {
        "serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
        "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878,
    },
    "dialects": {
        "serena": False, "vivian": False, "uncle_fu": False, "ryan": False, "aiden": False,
        "ono_anna": False, "sohee": False, "eric": "sichuan_dialect", "dylan": "beijing_dialect",
    },
    "languages": {
        "chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
        "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069,
        "beijing_dialect": 2074, "sichuan_dialect": 2062,
    },
}

# Widths and depths per profile; everything else (codec geometry, ids, speakers, languages) is the real model's.
TINY = {
    "talker": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 16, "mrope_section": [4, 2, 2], "text_hidden_size": 32},
    "code_predictor": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "num_key_value_heads": 1, "head_dim": 16},
    "speaker_encoder": {"enc_channels": [32, 32, 32, 32, 96], "enc_attention_channels": 16, "enc_res2net_scale": 4,
                        "enc_se_channels": 16},
    "text_vocab_size": None,  # the tokenizer's own size
}
# The real Qwen3-TTS-12Hz-0.6B-CustomVoice configuration (905.8M + 153.7M parameters), read from its config files:
# tools/qwen3-tts-configs/ is a copy of ../shared/qwen3-tts/configs/, in the repo so that a machine that gets only the
# working tree (the GPU benchmark's) builds the same checkpoint.
REAL_CONFIG_DIR = HERE / "qwen3-tts-configs"
_WIDTHS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
           "head_dim")


def _real_config(name: str) -> dict:
    return json.loads((REAL_CONFIG_DIR / name).read_text(encoding="utf-8"))


def _full_profile() -> dict:
    talker = _real_config("0.6B-CustomVoice.config.json")["talker_config"]
    predictor = talker["code_predictor_config"]
    return {
        "talker": {**{k: talker[k] for k in _WIDTHS}, "mrope_section": talker["rope_scaling"]["mrope_section"],
                   "text_hidden_size": talker["text_hidden_size"]},
        "code_predictor": {k: predictor[k] for k in _WIDTHS},
        # not in the released config: widths of the ECAPA speaker encoder of the Base model (1024-d embeddings)
        "speaker_encoder": {"enc_channels": [512, 512, 512, 512, 1536], "enc_attention_channels": 128,
                            "enc_res2net_scale": 8, "enc_se_channels": 128},
        "text_vocab_size": talker["text_vocab_size"],
    }


FULL = _full_profile()

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|tts_pad|>", "<|tts_bos|>", "<|tts_eos|>"]


# ---------------------------------------------------------------- text tokenizer: byte-level BPE, Qwen2 conventions
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the alphabet of every byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer(out: Path) -> dict[str, int]:
    """A byte-level BPE that the real Qwen2 tokenizer classes load. `generate()` slices prompts by token count, so
    "<|im_start|>assistant\\n" must be exactly 3 tokens: "assistant" gets its own merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = _byte_to_unicode()
    vocab = {ch: i for i, ch in enumerate(alphabet[b] for b in range(256))}
    merges = [("a", "s"), ("as", "s"), ("i", "s"), ("ass", "is"), ("t", "a"), ("n", "t"), ("ta", "nt"),
              ("assis", "tant")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.json")
        tok.save(path)
        fast = Qwen2TokenizerFast(
            tokenizer_file=path, unk_token=None, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
            model_max_length=32768,
        )
        fast.save_pretrained(str(out))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    ids["assistant"] = vocab["assistant"]
    ids["vocab_size"] = tok.get_vocab_size()
    return ids


# ---------------------------------------------------------------- configurations (the real layout, tiny widths)
def talker_config(kind: str, profile: dict) -> dict:
    t, cp = profile["talker"], profile["code_predictor"]
    return {
        "model_type": "qwen3_tts_talker",
        "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
        "num_hidden_layers": t["num_hidden_layers"], "num_attention_heads": t["num_attention_heads"],
        "num_key_value_heads": t["num_key_value_heads"], "head_dim": t["head_dim"], "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000,
        "rope_scaling": {"interleaved": True, "mrope_section": t["mrope_section"], "rope_type": "default",
                         "type": "default"},
        "attention_bias": False, "attention_dropout": 0.0, "use_cache": True, "use_sliding_window": False,
        "position_id_per_seconds": 13, "vocab_size": 3072, "text_vocab_size": None,  # filled in by model_config
        "text_hidden_size": t["text_hidden_size"], "num_code_groups": 16,
        "codec_pad_id": 2148, "codec_bos_id": 2149, "codec_eos_token_id": 2150, "codec_think_id": 2154,
        "codec_nothink_id": 2155, "codec_think_bos_id": 2156, "codec_think_eos_id": 2157,
        "codec_language_id": dict(REAL_CONFIGS["languages"]),
        "spk_id": {} if kind in ("base", "voice_design") else dict(REAL_CONFIGS["speakers"]),
        "spk_is_dialect": {} if kind in ("base", "voice_design") else dict(REAL_CONFIGS["dialects"]),
        "code_predictor_config": {
            "model_type": "qwen3_tts_talker_code_predictor",
            **cp, "hidden_act": "silu", "max_position_embeddings": 65536, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000, "attention_bias": False, "use_cache": True, "vocab_size": 2048,
            "num_code_groups": 16,
        },
    }


def model_config(kind: str, size: str, tok_ids: dict[str, int], profile: dict) -> dict:
    talker = talker_config(kind, profile)
    talker["text_vocab_size"] = profile["text_vocab_size"] or tok_ids["vocab_size"]
    return {
        "architectures": ["Qwen3TTSForConditionalGeneration"],
        "model_type": "qwen3_tts",
        "tokenizer_type": "qwen3_tts_tokenizer_12hz",
        "tts_model_size": size,
        "tts_model_type": kind,
        "assistant_token_id": tok_ids["assistant"],
        "im_start_token_id": tok_ids["<|im_start|>"],
        "im_end_token_id": tok_ids["<|im_end|>"],
        "tts_pad_token_id": tok_ids["<|tts_pad|>"],
        "tts_bos_token_id": tok_ids["<|tts_bos|>"],
        "tts_eos_token_id": tok_ids["<|tts_eos|>"],
        "talker_config": talker,
        "speaker_encoder_config": {
            "mel_dim": 128, "enc_dim": profile["talker"]["hidden_size"], "enc_kernel_sizes": [5, 3, 3, 3, 1],
            "enc_dilations": [1, 2, 3, 4, 1], **profile["speaker_encoder"], "sample_rate": 24000,
        },
    }


GENERATION_CONFIG = {
    "do_sample": True, "top_k": 50, "top_p": 1.0, "temperature": 0.9, "repetition_penalty": 1.05,
    "subtalker_dosample": True, "subtalker_top_k": 50, "subtalker_top_p": 1.0, "subtalker_temperature": 0.9,
    "max_new_tokens": 8192,
}

TINY_SPEECH_TOKENIZER = {
    "architectures": ["Qwen3TTSTokenizerV2Model"],
    "model_type": "qwen3_tts_tokenizer_12hz",
    "encoder_valid_num_quantizers": 16,
    "input_sample_rate": 24000, "output_sample_rate": 24000,
    "decode_upsample_rate": 1920, "encode_downsample_rate": 1920,
    "decoder_config": {
        "attention_bias": False, "attention_dropout": 0.0,
        "latent_dim": 32, "codebook_dim": 32, "codebook_size": 2048, "decoder_dim": 64,
        "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
        "layer_scale_initial_scale": 0.01, "max_position_embeddings": 8000, "head_dim": 16,
        "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-05,
        "rope_theta": 10000, "semantic_codebook_size": 4096, "sliding_window": 72,
        "upsample_rates": [8, 5, 4, 3], "upsampling_ratios": [2, 2],
        "vector_quantization_hidden_dimension": 32,
    },
    "encoder_config": {
        "_frame_rate": 12.5, "audio_channels": 1, "sampling_rate": 24000,
        "codebook_size": 2048, "codebook_dim": 16, "num_quantizers": 32, "num_semantic_quantizers": 1,
        "vector_quantization_hidden_dimension": 16, "hidden_size": 32, "num_filters": 4,
        "num_residual_layers": 1, "upsampling_ratios": [8, 6, 5, 4], "kernel_size": 7, "last_kernel_size": 3,
        "residual_kernel_size": 3, "dilation_growth_rate": 2, "use_causal_conv": True, "pad_mode": "constant",
        "compress": 2, "trim_right_ratio": 1.0, "use_conv_shortcut": False, "upsample_groups": 32,
        "num_hidden_layers": 1, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "gelu", "max_position_embeddings": 8000, "norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": 250, "layer_scale_initial_scale": 0.01,
    },
}

FULL_SPEECH_TOKENIZER = _real_config("speech_tokenizer.config.json")

SPEECH_TOKENIZER_PREPROCESSOR = {
    "feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1, "sampling_rate": 24000,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "chunk_length_s": None,
    "overlap": None,
}

PROFILES = {"tiny": (TINY, TINY_SPEECH_TOKENIZER), "full": (FULL, FULL_SPEECH_TOKENIZER)}
CHECKPOINTS = {
    # name: (tts_model_type, tts_model_size, profile)
    "tiny-0.6B-CustomVoice": ("custom_voice", "0b6", "tiny"),
    "tiny-1.7B-CustomVoice": ("custom_voice", "1b7", "tiny"),
    "tiny-0.6B-Base": ("base", "0b6", "tiny"),
    "tiny-1.7B-VoiceDesign": ("voice_design", "1b7", "tiny"),
    # For benchmarks only (--full-size): the real 0.6B geometry with random weights, about 2.1 GB each.
    "random-0.6B-CustomVoice": ("custom_voice", "0b6", "full"),
    "random-0.6B-Base": ("base", "0b6", "full"),
}
TINY_NAMES = [name for name, (_, _, profile) in CHECKPOINTS.items() if profile == "tiny"]


# ---------------------------------------------------------------- weights
def variance_preserving_init(module, seed: int) -> None:
    """Random weights whose activations keep their scale through the network. The library's own init (normal, std
    0.02) makes the random vocoder output about 1e-10; with std 1/sqrt(fan_in) the output has a sensible level."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in sorted(module.named_modules(), key=lambda kv: kv[0]):
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d, nn.Conv2d)):
                w = mod.weight
                if isinstance(mod, nn.ConvTranspose1d):
                    fan_in = w.shape[0] * w.shape[2] // max(1, mod.stride[0])
                else:
                    fan_in = w[0].numel()
                w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(max(1, fan_in)))
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
            # Vector-quantizer codebooks (the decoder's and Mimi's) store a running sum, zero until trained.
            for attr in ("embedding_sum", "embed_sum"):
                table = getattr(mod, attr, None)
                if isinstance(table, torch.Tensor):
                    table.copy_(torch.randn(table.shape, generator=gen))
        # Zero the codec head's row for end-of-speech: with top-k sampling a zero logit among ~2000 random ones is
        # never in the top 50, so a random model always speaks for its whole token budget (deterministic lengths).
        talker = getattr(module, "talker", None)
        if talker is not None:
            eos = module.config.talker_config.codec_eos_token_id
            talker.codec_head.weight[eos].zero_()


def calibrate_output_level(decoder, seed: int, target_rms: float = 0.1) -> None:
    """The residual stacks of a random vocoder grow the signal about 3x per block; scale the last convolution so
    random codes decode to noise at about `target_rms` instead of a clipped square wave."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2048, (1, 16, 50), generator=gen)
    with torch.no_grad():
        rms = decoder(codes).pow(2).mean().sqrt().item()  # clamped to +-1, so iterate to converge
        final_conv = decoder.decoder[-1].conv
        for _ in range(4):
            final_conv.weight.mul_(target_rms / max(rms, 1e-6))
            rms = decoder(codes).pow(2).mean().sqrt().item()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def build_speech_tokenizer(out: Path, seed: int, config_dict: dict) -> None:
    import torch
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

    out.mkdir(parents=True, exist_ok=True)
    config = Qwen3TTSTokenizerV2Config(**copy.deepcopy(config_dict))
    torch.manual_seed(seed)
    model = Qwen3TTSTokenizerV2Model(config).eval()
    variance_preserving_init(model, seed)
    calibrate_output_level(model.decoder, seed)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    _write_json(out / "config.json", config_dict)  # ours, complete: save_pretrained's is not reloadable
    _write_json(out / "preprocessor_config.json", SPEECH_TOKENIZER_PREPROCESSOR)


def build_checkpoint(out: Path, kind: str, size: str, profile: dict, seed: int, tokenizer_src: Path,
                     speech_src: Path) -> None:
    import torch
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tokenizer_src.iterdir()):
        if f.name != "ids.json":
            shutil.copy(f, out / f.name)
    tok_ids = json.loads((tokenizer_src / "ids.json").read_text())
    cfg_dict = model_config(kind, size, tok_ids, profile)
    config = Qwen3TTSConfig(**copy.deepcopy(cfg_dict))
    torch.manual_seed(seed)
    model = Qwen3TTSForConditionalGeneration(config).eval()
    variance_preserving_init(model, seed)
    model.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)  # half the size; loads as any dtype
    _write_json(out / "config.json", cfg_dict)  # save_pretrained writes model_type "" for the speaker encoder
    _write_json(out / "generation_config.json", GENERATION_CONFIG)
    shutil.copytree(speech_src, out / "speech_tokenizer", dirs_exist_ok=True)


def fingerprint() -> str:
    """Changes whenever this script changes: a stale build is rebuilt, a current one is reused."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for config in sorted(REAL_CONFIG_DIR.glob("*.json")):
        digest.update(config.read_bytes())
    return digest.hexdigest()[:16]


def build_all(out_dir: Path, names: list[str] = TINY_NAMES, force: bool = False) -> list[Path]:
    """Build the named checkpoints into out_dir; ones already built by this version of the script are reused."""
    stamp = fingerprint()
    todo = [n for n in names if force or not (out_dir / n / ".fingerprint").is_file()
            or (out_dir / n / ".fingerprint").read_text() != stamp]
    if todo:
        import torch

        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            tmp = Path(tmp)
            tok_dir = tmp / "tokenizer"
            tok_dir.mkdir()
            _write_json(tok_dir / "ids.json", build_tokenizer(tok_dir))
            speech_dirs: dict[str, Path] = {}
            for name in todo:
                kind, size, profile_name = CHECKPOINTS[name]
                profile, speech_config = PROFILES[profile_name]
                if profile_name not in speech_dirs:
                    speech_dirs[profile_name] = tmp / f"speech_tokenizer-{profile_name}"
                    build_speech_tokenizer(speech_dirs[profile_name], SEED, speech_config)
                staging = tmp / name
                build_checkpoint(staging, kind, size, profile, SEED + 1 + list(CHECKPOINTS).index(name), tok_dir,
                                 speech_dirs[profile_name])
                (staging / ".fingerprint").write_text(stamp)
                final = out_dir / name
                if final.exists():
                    shutil.rmtree(final)
                staging.rename(final)  # a checkpoint appears whole or not at all
    return [out_dir / n for n in names]


def main(argv: list[str]) -> int:
    force = "--force" in argv
    names = [n for n, (_, _, profile) in CHECKPOINTS.items() if profile == "full"] if "--full-size" in argv \
        else TINY_NAMES
    args = [a for a in argv if not a.startswith("--")]
    out_dir = Path(args[0]) if args else HERE.parent / "build" / "checkpoints"
    for p in build_all(out_dir, names, force=force):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        print(f"{p}  ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
