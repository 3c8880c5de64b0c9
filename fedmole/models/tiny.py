"""Tiny random models and a deterministic locally trained tokenizer, for tests and smoke runs.

The tokenizer is a byte-level BPE trained with the `tokenizers` library on a fixed built-in corpus, so it
covers any text (bytes fall back to single tokens) and is identical on every machine. The models are
random but seeded, so two loads give identical weights.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

from fedmole.paths import cache_dir

TOKENIZER_VERSION = "v1"
VOCAB_SIZE = 1000
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

_CORPUS = """
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context.
### Instruction: ### Input: ### Response:
Define the word. Which part of speech is the word? noun verb adjective adverb
Give a synonym of the word. The word is a kind of what? It is an instance of what?
Write a sentence using the word. Suppose the premise. Can we infer that the hypothesis? Yes, No, or Maybe?
the of and to in a is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no what up its out into them
time more these two may first then do any like my now over such our man me even most made after also
did many before must through back years where much your way well down should because each just those
people how too little state good very make world still own see men work long get here between both life
being under never day same another know while last might us great old year off come since against go
came right used take three animal plant food person artifact body location group act event feeling
change motion communication cognition perception possession social contact creation consumption
emotion weather stative competition relation quantity substance shape process phenomenon attribute
"""


def _tokenizer_dir():
    return cache_dir() / "models" / f"tiny-tokenizer-{TOKENIZER_VERSION}"


def train_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (deterministic: same corpus, same trainer settings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.strip().splitlines() for _ in range(3)]
    tok.train_from_iterator(lines, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer, trained once and cached under the fedmole cache directory."""
    from transformers import AutoTokenizer

    path = _tokenizer_dir()
    if not (path / "tokenizer.json").is_file():
        tmp = path.with_name(path.name + ".tmp")
        train_tiny_tokenizer().save_pretrained(tmp)
        try:
            tmp.replace(path)
        except OSError:  # another process won the race; its copy is identical
            pass
    return AutoTokenizer.from_pretrained(path)


def _seeded_init(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _seeded_init(lambda: LlamaForCausalLM(config), seed)


def tiny_olmoe(
    vocab_size: int,
    seed: int = 0,
    num_experts: int = 8,
    top_k: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 32,
    num_layers: int = 2,
) -> OlmoeForCausalLM:
    """A random OLMoE; the defaults are the `tiny-olmoe` built-in, the keywords scale it (benchmarks)."""
    config = OlmoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _seeded_init(lambda: OlmoeForCausalLM(config), seed)
