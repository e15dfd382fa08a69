"""Text <-> ids through the checkpoint's own Hugging Face tokenizer files, with its chat template when asked."""

from __future__ import annotations

from .models import inspect


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    def render(self, messages: list[dict], chat_template: bool | str = True, system_prompt: str | None = None
               ) -> str:
        """A conversation (a list of {role, content}) as prompt text, through the checkpoint's chat template
        (True) or the given Jinja template string, with the generation prompt appended. `system_prompt` becomes
        a leading system turn unless the conversation has one of its own."""
        if chat_template is False:
            raise ValueError("a conversation needs a chat template; set chat_template to true or a template string")
        template = chat_template if isinstance(chat_template, str) else None
        if template is None and not getattr(self.hf, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; set chat_template to false or a template string")
        if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return self.hf.apply_chat_template(list(messages), chat_template=template, add_generation_prompt=True,
                                           tokenize=False)

    def prompt_text(self, text: str, chat_template: bool | str = False, system_prompt: str | None = None) -> str:
        """The text the model gets for a plain prompt: `text` as it is, or with a chat template (True: the
        checkpoint's, or a Jinja string) a single user turn (after a system turn holding `system_prompt`, if given)
        with the generation prompt appended."""
        if chat_template is False:
            return text
        return self.render([{"role": "user", "content": text}], chat_template, system_prompt)

    def encode(self, text: str, chat_template: bool | str = False, system_prompt: str | None = None) -> list[int]:
        """Token ids of `text` as the model gets it (see prompt_text)."""
        return self.encode_text(self.prompt_text(text, chat_template, system_prompt))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of text as it is (a rendered template carries its own special tokens: none are added)."""
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def encode_batch(self, texts, chat_template: bool | str = False) -> list[list[int]]:
        """Token ids of each text in a list (one string would be taken character by character: refused)."""
        if isinstance(texts, (str, bytes)):
            raise ValueError("encode_batch takes a list of texts, not one string; use encode(text) for one prompt "
                             "or encode_batch([text])")
        return [self.encode(t, chat_template) for t in texts]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


def load_tokenizer(source, revision: str | None = None, trust_remote_code: bool = False) -> Tokenizer:
    """The tokenizer stored with a checkpoint (built-in name, directory, or cached hub repo id)."""
    from transformers import AutoTokenizer

    path = inspect(source, revision).require_tokenizer()
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer warns about our model_type in config.json; it is not its concern
    try:
        return Tokenizer(AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code))
    finally:
        hf_logging.set_verbosity(level)
