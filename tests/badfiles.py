"""Bad inputs of every kind the issue names, written to a folder."""
import io
import os

from PIL import Image


def write_bad_files(folder) -> dict[str, str]:
    """name -> path of: a non-image, a truncated JPEG, a 1x1 PNG, a 20000x20000 PNG, an empty file."""
    os.makedirs(folder, exist_ok=True)
    paths = {}

    def put(name, data):
        p = os.path.join(folder, name)
        with open(p, "wb") as f:
            f.write(data)
        paths[name] = p

    put("notes.txt", b"this is not an image\n" * 10)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="JPEG")
    put("truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    put("pixel.png", buf.getvalue())
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")  # 1-bit: 50 MB in memory, tiny on disk
    put("huge.png", buf.getvalue())
    put("empty.png", b"")
    return paths
