from msvit.demo.run import main

main()
