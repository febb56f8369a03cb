"""The feedback loop of docs/chat.md end to end, with a simulated user, against `gptjax serve`.

    python benchmarks/feedback_loop.py collect URL [--questions 150 --samples 4 --likes '?']
    python benchmarks/feedback_loop.py measure URL [--questions 100 --samples 4 --likes '?']

The questions are chitchat conversations cut before an assistant turn (the first three messages:
user, assistant, user) that leave room for a reply in the context: `collect` takes them from the
start of the corpus, `measure` from its end, so the replies measured answer conversations no
feedback was given on. The simulated user likes a reply that holds `--likes` (default '?':
replies that ask something back).

collect: asks each question --samples times (temperature 1, seeds 0..), posts a rating of each
reply to /v1/feedback (good when it holds --likes, bad otherwise), and prints how many replies,
good ratings and preference pairs the server wrote (RUN/feedback/prefs.jsonl).
measure: asks each question --samples times (temperature 1, fixed seeds) and prints the share of
replies the user likes, with its standard error.
"""

import argparse
import json
import math
import urllib.request

from gptjax.data.sources import chitchat


def questions(n: int, from_end: bool) -> list[list[dict]]:
    """n distinct conversations' first three messages (user, assistant, user)."""
    talks = [m[:3] for _, m in chitchat.conversations(chitchat.dataset_file()) if len(m) > 3]
    if from_end:
        talks = talks[::-1]
    seen, out = set(), []
    for talk in talks:
        key = json.dumps(talk)
        if key not in seen:
            seen.add(key)
            out.append(talk)
        if len(out) == n:
            break
    return out


def post(url: str, path: str, body: dict, key: str | None) -> dict:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + path, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=600) as response:
        return json.load(response)


def ask(url, messages, seed, max_tokens, key) -> tuple[str, str]:
    body = {"messages": messages, "temperature": 1.0, "seed": seed, "max_tokens": max_tokens}
    answer = post(url, "/v1/chat/completions", body, key)
    return answer["id"], answer["choices"][0]["message"]["content"]


def fits(url, messages, max_tokens, key) -> bool:
    """The conversation leaves room for a reply of max_tokens in the model's context."""
    text = "".join(m["content"] for m in messages)
    tokens = post(url, "/tokenize", {"prompt": text}, key)
    return tokens["count"] + 4 * len(messages) + max_tokens <= tokens["max_model_len"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["collect", "measure"])
    p.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--questions", type=int, default=None, help="default 150 / 100")
    p.add_argument("--samples", type=int, default=4, help="replies per question")
    p.add_argument("--likes", default="?", help="the simulated user likes replies holding this")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--key", default=None, help="the server's API key, if it has one")
    args = p.parse_args()
    n = args.questions or (150 if args.what == "collect" else 100)
    talks = questions(2 * n, from_end=args.what == "measure")
    talks = [t for t in talks if fits(args.url, t, args.max_tokens, args.key)][:n]
    liked = replies = pairs = 0
    for talk in talks:
        for seed in range(args.samples):
            id_, reply = ask(args.url, talk, seed, args.max_tokens, args.key)
            good = args.likes in reply
            liked, replies = liked + good, replies + 1
            if args.what == "collect":
                rating = "good" if good else "bad"
                pairs += post(args.url, "/v1/feedback", {"id": id_, "rating": rating}, args.key)[
                    "pairs"
                ]
    share = liked / replies
    error = math.sqrt(share * (1 - share) / replies)
    print(
        f"{args.what}: {len(talks)} questions x {args.samples} replies = {replies}; "
        f"liked (holding {args.likes!r}): {liked} = {share:.3f} +- {error:.3f}"
        + (f"; preference pairs written: {pairs}" if args.what == "collect" else "")
    )


if __name__ == "__main__":
    main()
