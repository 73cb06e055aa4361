"""`griffinlm generate`: loads a checkpoint directory and streams bytes as text."""
import json

import pytest
import torch

from griffinlm import LanguageModel, ModelConfig
from griffinlm.cli import main
from griffinlm.data import ByteTokenizer
from griffinlm.inference import TextStreamer, stream_text


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
