from backupfs.cli import main

raise SystemExit(main())
