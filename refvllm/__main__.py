from refvllm.cli import main

raise SystemExit(main())
