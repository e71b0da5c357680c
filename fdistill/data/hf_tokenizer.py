"""Hugging Face tokenizer directories (`tokenizer.json`, `tokenizer_config.json`, chat templates),
read offline without `transformers` or torch.

What is read, and how it matches `transformers` 5.x (`PreTrainedTokenizerFast` /
`TokenizersBackend`; checked against transformers 5.25.0 by the committed fixtures of
`tests/fixtures/make_hf_data_fixtures.py`):

* `tokenizer.json` through the `tokenizers` package (the same Rust tokenizer transformers wraps).
  When `tokenizer_config.json` sets `add_bos_token` / `add_eos_token`, or `tokenizer.json` has no
  post-processor, transformers rebuilds the post-processor as the template
  `[bos] $A [eos]` with those flags (`TokenizersBackend.update_post_processor`); so does this module.
* special tokens `bos_token`, `eos_token`, `pad_token`, `unk_token` from `tokenizer_config.json`
  (a string, an AddedToken-style dict `{"content": ...}`, or absent / null), with
  `special_tokens_map.json` as a fallback.
* the chat template: `chat_template.jinja` (+ `additional_chat_templates/*.jinja`, as transformers
  >= 4.5x saves them) takes precedence over `tokenizer_config.json`'s `chat_template`, which is a
  string or a list of `{"name", "template"}` (named templates; `default` is used unless a name is
  given).
* `apply_chat_template` renders the template as transformers' `render_jinja_template` does
  (`transformers/utils/chat_template_utils.py`): a jinja2 `ImmutableSandboxedEnvironment` with
  `trim_blocks=True`, `lstrip_blocks=True` and the `loopcontrols` extension, the globals
  `raise_exception` (raises `jinja2.TemplateError`), `strftime_now`, `dict` and `namespace`, a
  `tojson` filter that is `json.dumps` (no HTML escaping; `ensure_ascii=False`), the variables
  `messages`, `add_generation_prompt`, `tools`, `documents` and every set special token
  (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...), extra keyword arguments overriding
  them; keys of a message whose value is None are dropped first. The rendered text is tokenized with
  `add_special_tokens=False`.
  (`{% generation %}` blocks are accepted and rendered as their body; assistant masks and
  `continue_final_message` are not implemented.)
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Sequence

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"


def _read_json(path: str, required: bool) -> dict:
    if not os.path.exists(path):
        if required:
            raise FileNotFoundError(f"{path}: not found")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _token_content(value: Any, where: str, name: str) -> str | None:
    """A special token given as a string, an AddedToken dict {"content": ...}, or None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: field {name!r} must be a string, a dict with a string 'content', or null; "
                     f"got {value!r}")


_compiled_cache: dict[str, Any] = {}


def compile_template(template: str):
    """The jinja2 template compiled in the sandbox transformers uses (see the module docstring)."""
    if template in _compiled_cache:
        return _compiled_cache[template]
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class _Namespace(jinja2.utils.Namespace):
        """jinja's namespace without underscore-prefixed attributes (as transformers restricts it)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for k in attrs:
                _Namespace._check(k)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class _Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    compiled = env.from_string(template)
    _compiled_cache[template] = compiled
    return compiled


class HFTokenizer:
    """A Hugging Face tokenizer directory: encode/decode, special tokens and the chat template.

    Build it with `HFTokenizer.from_dir(path)`. `files` lists the files it was read from (their
    contents name prepared datasets, see `fingerprint`)."""

    def __init__(self, tokenizer, config: dict, chat_template: str | dict[str, str] | None, path: str,
                 files: Sequence[str] = ()):
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.path = path
        self.files = tuple(files)
        self.special_tokens: dict[str, str] = {}
        where = os.path.join(path, CONFIG_FILE)
        for name in SPECIAL_TOKEN_NAMES:
            value = _token_content(config.get(name), where, name)
            if value is not None:
                self.special_tokens[name] = value
        for name, value in self.special_tokens.items():
            if self._tok.token_to_id(value) is None:
                raise ValueError(f"{where}: {name} {value!r} is not in the vocabulary of "
                                 f"{os.path.join(path, TOKENIZER_FILE)}")
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        if "add_bos_token" in config or "add_eos_token" in config or self._tok.post_processor is None:
            self._set_post_processor(bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False)))

    # ----- loading ----------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> "HFTokenizer":
        """Reads `tokenizer.json`, `tokenizer_config.json` (optional), `special_tokens_map.json`
        (optional) and the chat template(s) of a directory written by `save_pretrained`."""
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: tokenizer directory not found")
        tok_file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"{tok_file}: not found (a Hugging Face fast-tokenizer directory needs "
                                    f"{TOKENIZER_FILE}; slow sentencepiece-only tokenizers are not supported)")
        try:
            tokenizer = Tokenizer.from_file(tok_file)
        except Exception as e:  # noqa: BLE001 - the Rust error says what is wrong, the file is ours to name
            cause = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{tok_file}: not a valid tokenizers file ({cause})") from e
        files = [tok_file]
        config_file = os.path.join(path, CONFIG_FILE)
        config = _read_json(config_file, required=False)
        if config:
            files.append(config_file)
        stm_file = os.path.join(path, "special_tokens_map.json")
        stm = _read_json(stm_file, required=False)
        if stm:
            files.append(stm_file)
            for name in SPECIAL_TOKEN_NAMES:
                if config.get(name) is None and stm.get(name) is not None:
                    config = {**config, name: stm[name]}
        template, template_files = cls._read_templates(path, config)
        return cls(tokenizer, config, template, path, files + template_files)

    @staticmethod
    def _read_templates(path: str, config: dict) -> tuple[str | dict[str, str] | None, list[str]]:
        """transformers' precedence: chat_template.jinja and additional_chat_templates/*.jinja win over
        tokenizer_config.json's chat_template (a string or a list of {name, template})."""
        templates, files = {}, []
        jinja_file = os.path.join(path, TEMPLATE_FILE)
        if os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                templates["default"] = f.read()
            files.append(jinja_file)
        extra_dir = os.path.join(path, TEMPLATE_DIR)
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                        templates[name[: -len(".jinja")]] = f.read()
                    files.append(os.path.join(extra_dir, name))
        if templates:
            return (templates["default"] if list(templates) == ["default"] else templates), files
        value = config.get("chat_template")
        where = os.path.join(path, CONFIG_FILE)
        if value is None or isinstance(value, str):
            return value, []
        if isinstance(value, list):
            out = {}
            for i, item in enumerate(value):
                if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                        and isinstance(item.get("template"), str)):
                    raise ValueError(f"{where}: chat_template[{i}] must be a dict with string 'name' and 'template'")
                out[item["name"]] = item["template"]
            return out, []
        raise ValueError(f"{where}: field 'chat_template' must be a string or a list of {{name, template}}, "
                         f"got {type(value).__name__}")

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        from tokenizers import processors

        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = [(t, self._tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # ----- tokens -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text` (with the post-processor's BOS/EOS when `add_special_tokens`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a string, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _special_id(self, name: str) -> int | None:
        tok = self.special_tokens.get(name)
        return None if tok is None else self._tok.token_to_id(tok)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))

    # ----- chat templates ---------------------------------------------------------------------
    def get_chat_template(self, name: str | None = None, tools: Any = None) -> str:
        """The template string (transformers' `get_chat_template`: with named templates, `name`,
        else `tool_use` when tools are given and it exists, else `default`)."""
        where = os.path.join(self.path, CONFIG_FILE)
        if self.chat_template is None:
            raise ValueError(f"{where}: no chat template (no 'chat_template' field and no {TEMPLATE_FILE} in "
                             f"{self.path}); conversational data needs one")
        if isinstance(self.chat_template, str):
            if name is not None:
                raise ValueError(f"{where}: there is a single chat template; cannot select {name!r}")
            return self.chat_template
        if name is not None:
            if name not in self.chat_template:
                raise ValueError(f"{where}: no chat template named {name!r}; have {sorted(self.chat_template)}")
            return self.chat_template[name]
        if tools is not None and "tool_use" in self.chat_template:
            return self.chat_template["tool_use"]
        if "default" in self.chat_template:
            return self.chat_template["default"]
        raise ValueError(f"{where}: several chat templates {sorted(self.chat_template)} and none is named "
                         "'default'; pass template_name=")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, *, tools: list | None = None, documents: list | None = None,
                            template_name: str | None = None, **kwargs) -> str | list[int]:
        """The rendered conversation (str), or its token ids (`tokenize=True`, no special tokens added)."""
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise TypeError(f"message {i} must be a dict, got {type(m).__name__}")
            chat.append({k: v for k, v in m.items() if v is not None})
        template = compile_template(self.get_chat_template(template_name, tools))
        variables = {**self.special_tokens, **kwargs}
        text = template.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text
