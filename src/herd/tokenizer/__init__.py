"""Tokenizers: the official Llama 3 tiktoken BPE, other Llama-family vocabularies (Hugging Face
tokenizer.json, GGUF), streaming decoding and the chat formats."""

from herd.tokenizer.base import StreamDecoder, Tokenizer
from herd.tokenizer.chat import (
    LLAMA3_CHAT_TEMPLATE,
    ChatFormat,
    TemplateChatFormat,
    chat_format,
)
from herd.tokenizer.formats import load_tokenizer, save_tokenizer
from herd.tokenizer.hf import HFTokenizer
from herd.tokenizer.llama3 import TiktokenTokenizer, llama3

__all__ = [
    "LLAMA3_CHAT_TEMPLATE",
    "ChatFormat",
    "HFTokenizer",
    "StreamDecoder",
    "TemplateChatFormat",
    "TiktokenTokenizer",
    "Tokenizer",
    "chat_format",
    "llama3",
    "load_tokenizer",
    "save_tokenizer",
]
