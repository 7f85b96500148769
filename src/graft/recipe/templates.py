"""The chat templates a recipe can name (``chat_template: chatml``), as mergekit 0.1.5 ships.

Written for graft from the formats' public definitions, and checked to render the very
strings mergekit's own templates render (tests/test_recipes_tokenizer.py), including their
quirks, so a recipe gives the same prompts in both tools. Templates are rendered by
transformers with ``trim_blocks`` and ``lstrip_blocks``; these use expression blocks only
where whitespace matters, so they read the same either way.

Quirks kept for parity (mergekit's templates, not the formats' reference templates):

* ``llama3``: a newline after every ``<|eot_id|>``; each message's content is trimmed.
* ``alpaca``: the last system message (trimmed) then a blank line lead the prompt, even
  when empty; turns are separated by a blank line, but the generation prompt follows the
  last turn directly (``...Bye### Response:``); system messages are otherwise skipped.
* ``mistral``: no generation prompt (the ``[/INST]`` already ends the prompt).
* ``exaone``: the indentation of mergekit's template file ends up in the prompt.
"""

from __future__ import annotations

_CHATML = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_LLAMA3 = (
    r"{% for message in messages %}"
    r"{% if loop.first %}{{ bos_token }}{% endif %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    r"{{ message['content'] | trim }}{{ '<|eot_id|>\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    r"{% endif %}"
)

_ALPACA = (
    r"{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
    r"{{ (system | last).content | trim if system else '' }}{{ '\n\n' }}"
    r"{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', "
    r"'user_context': '### Input:'} %}"
    r"{% for message in messages %}"
    r"{% if message['role'] in headers %}"
    r"{{ headers[message['role']] + '\n' + message['content'] | trim }}"
    r"{% if not loop.last %}{{ '\n\n' }}{% endif %}"
    r"{% endif %}"
    r"{% endfor %}"
    r"{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
    r"{{ '### Response:\n' }}{% endif %}"
)

_MISTRAL = (
    r"{% if messages[0]['role'] == 'system' %}"
    r"{% set system_message = messages[0]['content'] %}{% set turns = messages[1:] %}"
    r"{% else %}{% set turns = messages %}{% endif %}"
    r"{{ bos_token }}"
    r"{% for message in turns %}"
    r"{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    r"{{ raise_exception('After the optional system message, conversation roles must "
    r"alternate user/assistant/user/assistant/...') }}"
    r"{% endif %}"
    r"{% if message['role'] == 'user' %}"
    r"{% set prefix = system_message + '\n\n' if loop.first and system_message is defined else '' %}"
    r"{{ ' [INST] ' + prefix + message['content'] + ' [/INST]' }}"
    r"{% elif message['role'] == 'assistant' %}"
    r"{{ ' ' + message['content'] + eos_token }}"
    r"{% else %}"
    r"{{ raise_exception('Only user and assistant roles are supported, with the exception "
    r"of an initial optional system message!') }}"
    r"{% endif %}"
    r"{% endfor %}"
)

_EXAONE = (
    r"{% for message in messages %}"
    r"{% if loop.first and message['role'] != 'system' %}"
    r"{{ '        [|system|][|endofturn|]\n\n' }}{% endif %}"
    r"{{ '    [|' + message['role'] + '|]' + message['content'] + '\n' }}"
    r"{{ '        \n\n' if message['role'] == 'user' else '        [|endofturn|]\n\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '    [|assistant|]\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "exaone": _EXAONE,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
}
