"""The README's offline vLLM example runs as written (vLLM's defaults, torch.compile included) on a tiny folder in
place of the converted checkpoint. The server's client example is what test_vllm_server.py runs."""

import re
import runpy
from pathlib import Path

README = Path(__file__).parents[2] / "README.md"


def offline_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [block for block in blocks if re.search(r"^from vllm import LLM", block, flags=re.M)]
    return block


def test_readme_offline_example_runs(reference, reference_images, engines, tmp_path, monkeypatch, capsys):
    engines.close()
    for name, image in zip(["photo.jpg", "cat.jpg", "dog.jpg"], reference_images):
        image.save(tmp_path / name)
    script = tmp_path / "example.py"
    script.write_text(offline_example().replace('"magma-v1"', repr(str(reference["dir"] / "normal"))))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    texts = eval(capsys.readouterr().out.strip().splitlines()[-1])  # the example prints the list of texts
    assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(text, str) for text in texts)
