from fastdino.cli import main

raise SystemExit(main())
