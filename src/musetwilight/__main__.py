from .shells.cli import main

raise SystemExit(main())
