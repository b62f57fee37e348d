from mta.cli import main

raise SystemExit(main())
