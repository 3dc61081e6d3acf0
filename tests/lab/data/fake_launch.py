"""Stand-in for launch.py in the sweep tests (``lab.sweep.launch_py`` is monkeypatched to this file).

``fake_launch.py run --json PATH ... --vcpus N ...``: for N == 1 it writes ``template.json`` (found two
levels above PATH, in the sweep's output directory) as the results document and exits 1, like a run
that ended in FAILURE; for any other N it writes to stderr and exits 3 without a document (a crash).
"""

import shutil
import sys
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--json") + 1])
vcpus = int(args[args.index("--vcpus") + 1]) if "--vcpus" in args else 2
if vcpus == 1:
    shutil.copy(out.parent.parent / "template.json", out)
    sys.exit(1)
sys.stderr.write("fake_launch: some noise\nTraceback (most recent call last):\nRuntimeError: boom\n")
sys.exit(3)
