"""`gptjax chat RUN_DIR`: talk to a chat model in the terminal.

Each reply streams as it is generated. The conversation is kept within the model's context: when
the next prompt would not leave room for a reply, the oldest turns are dropped (the system
message stays). Commands: `/reset` forgets the conversation, `/system TEXT` sets the system
message (`/system` alone removes it), `/help`; Ctrl-C stops a reply, Ctrl-D quits.
"""

from __future__ import annotations

import dataclasses
import sys

from gptjax.inference.chatbot import Chatbot
from gptjax.inference.settings import ContextError, Settings

PROMPT = "you> "
REPLY = "bot> "
HELP = "/reset forgets the conversation, /system TEXT sets the system message, Ctrl-D quits"


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def run(bot: Chatbot, settings: Settings, system: str | None = None, out=None) -> int:
    out = sys.stdout if out is None else out  # looked up now: sys.stdout may be replaced
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # not on every platform
        pass
    say = lambda text="": print(text, file=out, flush=True)
    say(f"gptjax chat: {bot.name} ({bot.context}-token context). {HELP}.")
    messages: list[dict] = []
    turn = 0
    echo = not _is_terminal(sys.stdin)  # piped input: show it, so the output is a transcript
    while True:
        try:
            line = input(PROMPT)
            if echo:
                print(line, flush=True)  # where input() wrote the prompt
        except EOFError:  # Ctrl-D
            say()
            return 0
        except KeyboardInterrupt:
            say()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command == "/reset":
                messages = []
                say("(conversation forgotten)")
            elif command == "/system":
                system = argument.strip() or None
                say(f"(system message: {system!r})" if system else "(no system message)")
            else:
                say(HELP)
            continue
        head = [{"role": "system", "content": system}] if system else []
        asked = head + messages + [{"role": "user", "content": line}]
        try:
            fitted = bot.fit(asked, settings.max_new_tokens)
        except ContextError as error:
            say(f"(not sent: {error})")
            continue
        dropped = len(asked) - len(fitted)
        if dropped:
            say(f"(dropped the {dropped} oldest messages to fit the context)")
        out.write(REPLY)
        out.flush()
        answer = ""
        try:
            seeded = dataclasses.replace(settings, seed=settings.seed + turn)
            for piece in bot.reply(fitted, seeded):
                answer += piece.text
                out.write(piece.text)
                out.flush()
        except KeyboardInterrupt:  # stop this reply, keep what was said
            out.write(" [stopped]")
        say()
        turn += 1
        messages = fitted[len(head) :] + [{"role": "assistant", "content": answer}]
