"""`griffinlm generate`: loads a checkpoint directory and streams bytes as text."""
import json

import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.cli import main
from griffinlm.data import ByteTokenizer
from griffinlm.inference import StopStrings, TextStreamer, generate_text, stream_text


@pytest.fixture()
def checkpoint(tmp_path):
    from safetensors.torch import save_file

    m = LanguageModel(ModelConfig.preset("griffin-tiny", width=64, depth=3, num_heads=2, local_window=6)).eval()
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return m, str(tmp_path)


def test_cli_streams_the_greedy_continuation(checkpoint, capsys):
    m, path = checkpoint
    assert main(["generate", "--checkpoint", path, "--prompt", "héllo", "--max-new-tokens", "12",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode("héllo").tolist()
    want = m.generate(torch.tensor([ids]), 12)[0, len(ids):]
    assert out == "héllo" + tok.decode(want) + "\n"


def test_cli_sampling_is_seeded_and_checks_arguments(checkpoint, capsys):
    _, path = checkpoint
    args = ["generate", "--checkpoint", path, "--prompt", "a", "--max-new-tokens", "10", "--temperature", "1",
            "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--no-echo"]
    assert main(args) == 0 and main(args) == 0
    first, second = capsys.readouterr().out.split("\n")[:2]
    assert first == second
    assert main(args + ["--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", path + "/nope", "--prompt", "a"]) == 2


def test_text_streamer_joins_split_utf8():
    s = TextStreamer(ByteTokenizer())
    pieces = [s.push(b) for b in "é€".encode()] + [s.flush()]
    assert "".join(pieces) == "é€" and pieces[0] == ""


def test_stream_text_stops_at_eos(checkpoint):
    m, _ = checkpoint
    tok = ByteTokenizer()
    with torch.no_grad():
        m.embed.weight[tok.eos_id] *= 50  # make EOS the argmax
    assert "".join(stream_text(m, tok, "x", 10)) == ""


def test_cli_names_a_damaged_or_mismatched_weights_file(checkpoint, capsys):
    _, path = checkpoint
    weights = f"{path}/model.safetensors"
    good = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(good[:1000])  # truncated
    assert main(["generate", "--checkpoint", path, "--prompt", "a"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    cfg = json.loads(open(f"{path}/config.json").read())
    with open(weights, "wb") as f:
        f.write(good)
    with open(f"{path}/config.json", "w") as f:
        json.dump({**cfg, "depth": cfg["depth"] + 1}, f)  # weights lack the extra block
    assert main(["generate", "--checkpoint", path, "--prompt", "a"]) == 2
    assert "missing" in capsys.readouterr().err


# Seeded sampling: the tiny random model's greedy text repeats one character, a sampled one
# does not; a fixed seed makes it as reproducible (one draw per step, so a run cut short by a
# stop string draws the same tokens up to the cut).
SAMPLED = dict(temperature=1.0, top_k=20, seed=5, stop_at_eos=False)


def _stop_after(text: str, start: int = 3, length: int = 2) -> tuple[str, int]:
    """A substring of `text` whose first occurrence is at `start` or later, and that position."""
    for k in range(start, len(text) - length + 1):
        stop = text[k:k + length]
        if text.find(stop) >= start:
            return stop, text.find(stop)
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_ends_the_text_before_it(checkpoint):
    m, _ = checkpoint
    tok = ByteTokenizer()
    full = generate_text(m, tok, "héllo", 40, **SAMPLED)
    stop, at = _stop_after(full)
    pieces = list(stream_text(m, tok, "héllo", 40, stop=[stop], **SAMPLED))
    assert "".join(pieces) == full[:at] and stop not in "".join(pieces)
    assert generate_text(m, tok, "héllo", 40, stop=[stop], **SAMPLED) == full[:at]
    # a single string is one stop string; of several, the one that occurs first cuts
    assert generate_text(m, tok, "héllo", 40, stop=stop, **SAMPLED) == full[:at]
    assert generate_text(m, tok, "héllo", 40, stop=[full[-3:], stop, "never"], **SAMPLED) == full[:at]
    # a stop string longer than one piece, matched across pieces
    long_stop = full[at:at + 6]
    assert generate_text(m, tok, "héllo", 40, stop=[long_stop], **SAMPLED) == full[:full.find(long_stop)]


def test_a_stop_string_that_never_occurs_changes_nothing(checkpoint):
    m, _ = checkpoint
    tok = ByteTokenizer()
    full = list(stream_text(m, tok, "héllo", 40, **SAMPLED))
    text = "".join(full)
    # starts like text that is generated (so pieces are held back a while), never occurs whole
    near = [text[i:i + 2] + "\x00\x01never" for i in range(0, len(text) - 2, 3)]
    assert all(n not in text for n in near)
    assert "".join(stream_text(m, tok, "héllo", 40, stop=near, **SAMPLED)) == text
    assert generate_text(m, tok, "héllo", 40, stop=["\x00\x01never"], **SAMPLED) == text
    # the held-back tail is flushed at the end: a stop string that begins like the last characters
    tail = text[-2:] + "\x00\x01never"
    pieces = list(stream_text(m, tok, "héllo", 40, stop=[tail], **SAMPLED))
    assert "".join(pieces) == text and len(pieces) < len(full)  # the held pieces came out together


def test_stop_strings_hold_back_only_a_possible_beginning():
    cut = StopStrings(["abc", "xyz!"])
    assert cut.push("12a") == ("12", False)   # "a" may begin "abc"
    assert cut.push("b") == ("", False)       # "ab" too
    assert cut.push("d") == ("abd", False)    # released once it cannot
    assert cut.push("x") == ("", False)
    assert cut.push("yq") == ("xyq", False)
    assert cut.push("ab") == ("", False)
    assert cut.flush() == "ab"                # nothing matched: given back at the end
    cut = StopStrings(["abc"])
    assert cut.push("zza") == ("zz", False)
    assert cut.push("bcTAIL") == ("", True)   # the match spans pieces; nothing of it is emitted
    assert cut.push("more") == ("", True) and cut.flush() == ""
    cut = StopStrings(["abcd"])
    assert cut.push("xxabcabc") == ("xxabc", False)  # held back: at most len("abcd") - 1 characters


def test_empty_or_non_string_stop_is_refused(checkpoint):
    m, _ = checkpoint
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="stop"):
        stream_text(m, tok, "x", 5, stop=[""])  # refused at the call, before any generation
    with pytest.raises(ValueError, match="stop"):
        generate_text(m, tok, "x", 5, stop=["ok", ""])
    with pytest.raises(ValueError, match="stop"):
        generate_text(m, tok, "x", 5, stop=[3])
    assert generate_text(m, tok, "x", 5, stop=[]) == generate_text(m, tok, "x", 5)


def test_text_streamer_decodes_after_the_prompt_context():
    class Pieces:  # a SentencePiece-like tokenizer: "▁" is a space, dropped at the start of a text
        is_byte_level = False
        vocab = ["▁hello", "▁world", "!", "▁"]

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids).replace("▁", " ").lstrip(" ")

    tok = Pieces()
    alone = TextStreamer(tok)
    assert [alone.push(1), alone.push(2)] == ["world", "!"]
    after = TextStreamer(tok, context=[0])
    assert [after.push(1), after.push(2), after.flush()] == [" world", "!", ""]


def test_cli_stop_strings(checkpoint, capsys):
    m, path = checkpoint
    base = ["generate", "--checkpoint", path, "--prompt", "héllo", "--max-new-tokens", "40", "--temperature", "1",
            "--top-k", "20", "--seed", "5", "--ignore-eos", "--no-echo"]
    assert main(base) == 0
    full = capsys.readouterr().out
    assert full == generate_text(m, ByteTokenizer(), "héllo", 40, **SAMPLED) + "\n"
    stop, at = _stop_after(full[:-1])
    assert main(base + ["--stop", "\x00never", "--stop", stop]) == 0
    assert capsys.readouterr().out == full[:at] + "\n"
    assert main(base[:-1] + ["--stop", stop]) == 0  # echoed prompt, then the cut continuation
    assert capsys.readouterr().out == "héllo" + full[:at] + "\n"
    assert main(base + ["--stop", ""]) == 2
    captured = capsys.readouterr()
    assert "stop" in captured.err and captured.out == ""  # refused before anything is printed
    from griffinlm.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    assert "--stop" in sub.format_help()
