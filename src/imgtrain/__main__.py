from imgtrain.cli import main

raise SystemExit(main())
