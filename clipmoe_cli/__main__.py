from clipmoe_cli.main import main

raise SystemExit(main())
