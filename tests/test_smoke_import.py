import subprocess
import sys

import lnorm


def test_version_and_cli_help():
    assert lnorm.__version__
    out = subprocess.run([sys.executable, "-m", "lnorm", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "bench" in out.stdout
