from mgd_ray.cli import main

raise SystemExit(main())
