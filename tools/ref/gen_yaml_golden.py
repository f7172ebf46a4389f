#!/usr/bin/python3
"""Golden trees for tools/yaml.c: what Mix-of-Show's own reader makes of each option file.

train_edlora.py and test_edlora.py read their .yml with
    OmegaConf.to_container(OmegaConf.load(path), resolve=True)
(PyYAML's SafeLoader plus OmegaConf's float resolver, which reads `1e-3` as a float, and its
duplicate-key check). This script applies exactly that to
  - every official option file, ../shared/mixofshow-data/options/**/*.yml  -> official.json,
    keyed by the path relative to options/ (the test also finds the copies kept in
    tests/data/yaml/ by their base name);
  - tests/data/yaml/quirks.yml (edge cases of the subset)                 -> quirks.json,
and checks that plain yaml.safe_load agrees on the official files (they spell every float
that PyYAML would not resolve as `!!float`). Non-finite floats, which JSON cannot hold, are
written as {"__float__": "inf" | "-inf" | "nan"}. Debian packages: python3-yaml,
python3-omegaconf.

    /usr/bin/python3 tools/ref/gen_yaml_golden.py [--options ../shared/mixofshow-data/options]
"""
import argparse, glob, json, math, os

import yaml
import omegaconf
from omegaconf import OmegaConf

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DATA = os.path.join(ROOT, "tests", "data", "yaml")


def load(path):
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def encode(x):
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": "nan" if x != x else ("inf" if x > 0 else "-inf")}
    if isinstance(x, dict):
        return {str(k): encode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [encode(v) for v in x]
    return x


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print("wrote", os.path.relpath(path, ROOT), len(obj["files"]), "files")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--options", default=os.path.join(ROOT, "..", "shared", "mixofshow-data", "options"))
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.options, "**", "*.yml"), recursive=True))
    if not files:
        raise SystemExit("no .yml under " + a.options)
    official = {}
    for f in files:
        rel = os.path.relpath(f, a.options).replace(os.sep, "/")
        tree = load(f)
        with open(f) as fh:
            assert yaml.safe_load(fh) == tree, rel + ": yaml.safe_load and OmegaConf disagree"
        official[rel] = encode(tree)
    meta = {"pyyaml": yaml.__version__, "omegaconf": omegaconf.__version__}
    write(os.path.join(DATA, "official.json"), {"__meta__": meta, "files": official})
    write(os.path.join(DATA, "quirks.json"), {"__meta__": meta, "files": {"quirks.yml": encode(load(os.path.join(DATA, "quirks.yml")))}})


if __name__ == "__main__":
    main()
