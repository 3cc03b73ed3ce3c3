"""The exit status of every `python data_process.py ...` command, and the one place that turns the pipeline's
errors into it: a one-line message on stderr and the documented code, never a traceback.

    0 success; 1 nothing at all could be read; 2 a bad recipe or arguments; 3 the data dir is in use by another
    run; 4 the disk is full; 5 a step's input is missing or damaged
"""
from __future__ import annotations

import sys
from pathlib import Path

EXIT_NOTHING_READ, EXIT_BAD_ARGS, EXIT_LOCKED, EXIT_DISK_FULL, EXIT_MISSING_INPUT = 1, 2, 3, 4, 5


def run_command(job, data_dir: Path, value_error_exit: int = EXIT_BAD_ARGS):
    """`job()`'s result, or the exit code for the error it raised (after printing it in one line): a locked data
    dir, a missing or damaged input, a full disk, a nothing-read run, an engine that cannot start, and
    ValueErrors (bad settings: `value_error_exit`). Other errors are bugs and propagate."""
    from data_process.executor import EngineError
    from data_process.pipeline import NothingReadError
    from data_process.records import MissingInputError, RecordsError
    from fileio import DiskFullError, LockedError, disk_full_message, is_disk_full
    try:
        return job()
    except EngineError as e:
        code, message = EXIT_BAD_ARGS, str(e)
    except NothingReadError as e:
        code, message = EXIT_NOTHING_READ, str(e)
    except LockedError as e:
        code, message = EXIT_LOCKED, str(e)
    except (MissingInputError, RecordsError) as e:
        code, message = EXIT_MISSING_INPUT, str(e)
    except ValueError as e:
        code, message = value_error_exit, str(e)
    except OSError as e:
        if not is_disk_full(e):
            raise
        # DiskFullError already names the path and the space; a bare ENOSPC from elsewhere gets the same line
        code = EXIT_DISK_FULL
        message = (e.strerror if isinstance(e, DiskFullError) else disk_full_message(e.filename or data_dir)) + \
            ". Free some space (or use --data-dir elsewhere) and re-run: finished work is kept"
    print(f"error: {message}", file=sys.stderr)
    return code
