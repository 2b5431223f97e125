"""The fake dataset writers (tests/support/fakes.py) produce the real file names."""

from pathlib import Path

from support.fakes import write_cifar, write_fashion_mnist


def test_fake_writers_produce_the_real_file_names(tmp_path: Path) -> None:
    write_cifar(tmp_path / "c10")
    assert sorted(p.name for p in (tmp_path / "c10" / "cifar-10-batches-py").iterdir()) == [
        "batches.meta",
        *[f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
    ]
    write_fashion_mnist(tmp_path / "fm")
    assert {p.name for p in (tmp_path / "fm").iterdir()} == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
