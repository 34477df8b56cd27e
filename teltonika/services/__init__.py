"""IService classes shared by the twistd plugins: the ops HTTP endpoint, timers, shutdown."""
