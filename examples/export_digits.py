"""Export scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels) as PNG files into examples/digits/.

Split: train_test_split(test_size=0.2, stratify=y, random_state=0) -> train/<digit>/ and val/<digit>/.
Run once (needs scikit-learn, which vitcli itself does not):  python examples/export_digits.py
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

out = Path(__file__).parent / "digits"
X, y = load_digits(return_X_y=True)
idx = np.arange(len(y))
tr, va = train_test_split(idx, test_size=0.2, stratify=y, random_state=0)
for split, ids in (("train", tr), ("val", va)):
    for i in ids:
        folder = out / split / str(y[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (X[i].reshape(8, 8) * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
print(f"wrote {len(tr)} train and {len(va)} val images to {out}")

# The bar a ViT should reach: an RBF support-vector machine on exactly this split.
if __name__ == "__main__":
    from sklearn.svm import SVC

    acc = SVC(kernel="rbf", gamma=0.001, C=10).fit(X[tr], y[tr]).score(X[va], y[va])
    print(f"RBF SVM (gamma=0.001, C=10) val accuracy: {acc:.4f}")
