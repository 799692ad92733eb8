from backupfs.cli.main import main

raise SystemExit(main())
