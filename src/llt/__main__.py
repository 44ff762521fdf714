from llt.cli import main

raise SystemExit(main())
