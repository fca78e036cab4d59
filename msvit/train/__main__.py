from msvit.train.cli import main

main()
