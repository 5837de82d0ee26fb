import sys

from injector.commands.cli import main

sys.exit(main())
