module flatfs.test/gotar

go 1.19
